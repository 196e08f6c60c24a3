"""Training a cross-layer transcoder from the activation store.

1. `fit_scales`: per-layer scalars that bring E||x|| (and E||y||) to sqrt(d_model).
2. `init_encoder`: thresholds at `init_threshold`, b_enc so each feature fires on
   `init_rate` of tokens, and the STE bandwidth from the pre-activation scale.
3. `Trainer`: Adam on the paper's loss (`loss_terms`): MSE summed over d_model and
   layers and averaged over tokens, plus lambda * tanh(c * ||W_dec_f|| * a_f) with lambda
   ramped linearly, plus a small relu(threshold - h) * ||W_dec_f|| pre-activation loss.
   Checkpoints every `checkpoint_every` steps make a killed run resume exactly.
4. `validate`: per-layer NMSE (fraction of variance unexplained), L0 and dead features on
   the held-out documents.
5. `calibrate_thresholds` (topk / batchtopk only) and `export` to circuit-tracer's format;
   with `kl_steps`, first the KL phase (`pipeline.finetune`) in raw space, through the
   spliced model, checkpointed every `checkpoint_every` of its steps as well.

Under `torchrun --nproc_per_node=N -m stages.train` the run is feature (tensor) parallel:
every rank builds the same initialised transcoder (same seed, same init sample), keeps its
slice of every layer's features (`CrossLayerTranscoder.shard`) and reads the same batches
(the data order is a function of seed and step only). Per step, the partial
reconstructions are summed by one all-reduce (inside the forward pass); the decoder norms,
the sparsity and pre-activation terms and Adam are local to each rank's features; a
second small all-reduce averages the gradient of the replicated `b_dec` and sums the
logged loss terms (and the squared gradient norm for `max_grad_norm`) in one buffer
(`sync_gradients`). A checkpoint (`pipeline.checkpoint`) is one safetensors file of slices per rank
and a JSON index of which file holds which features of each tensor, so a run resumes at
any number of ranks; rank 0 runs the KL phase on the gathered transcoder, validates and
exports it, while the other ranks wait.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import itertools
import json
import logging
import math
import os
import shutil
import sysconfig
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.checkpoint import Checkpoint, adam, adam_tensors, load_adam
from pipeline.clt import CLTShape, CrossLayerTranscoder, export_transcoder, raw_space
from pipeline.clt_ops import jumprelu_ops, needs_grad_mask
from pipeline.config import Params, TrainConfig
from pipeline.distributed import World, broadcast_object, fault, local_device, wait_for_ranks, world
from pipeline.loader import ActivationLoader, Batch, rows_mask
from pipeline.runtime import keep_freed_memory, resolve_device, torch_dtype
from pipeline.store import ACTIVATIONS, ActivationStore

logger = logging.getLogger(__name__)


def sample_rows(
    store: ActivationStore, split: str, val_fraction: float, n: int, max_norm_ratio: float = 0.0
) -> dict[str, torch.Tensor]:
    """Up to `n` rows of `split` in store order, as float32 (for statistics and init)."""
    mask = rows_mask(store, split, val_fraction, max_norm_ratio)
    out = {name: [] for name in ACTIVATIONS}
    have = 0
    for shard in range(store.schema.n_shards):
        start, stop = store.schema.shard_rows(shard)
        keep = np.flatnonzero(mask[start:stop])[: n - have]
        for name in ACTIVATIONS:
            out[name].append(store.to_torch(store.read_rows(name, start, stop, keep)).float())
        have += len(keep)
        if have >= n:
            break
    return {name: torch.cat(parts) for name, parts in out.items()}


def fit_scales(model: CrossLayerTranscoder, sample: dict[str, torch.Tensor]) -> None:
    """Set the per-layer scalars so that E||x_l|| = E||y_l|| = sqrt(d_model) after scaling."""
    root_d = math.sqrt(model.shape.d_model)
    with torch.no_grad():
        model.input_scale.copy_(root_d / sample["resid_mid"].norm(dim=-1).mean(0))
        model.output_scale.copy_(root_d / sample["mlp_out"].norm(dim=-1).mean(0).clamp_min(1e-6))


def init_encoder(model: CrossLayerTranscoder, x: torch.Tensor, cfg: TrainConfig) -> float:
    """Thresholds, encoder bias and STE bandwidth from normalised inputs `x`; returns the bandwidth."""
    with torch.no_grad():
        h = torch.einsum("tld,ldf->ltf", x, model.W_enc)  # (n_layers, n_tokens, d_tc), no bias yet
        if model.shape.activation == "jumprelu":
            model.log_threshold.fill_(math.log(cfg.init_threshold))
            quantile = torch.quantile(h, 1 - cfg.init_rate, dim=1)  # (n_layers, d_tc)
            model.b_enc.copy_(cfg.init_threshold - quantile)
        return cfg.bandwidth * h.std().item()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last 20% of steps."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay_start = int(0.8 * cfg.n_steps)
    decay = 1.0 if step < decay_start else max(0.0, (cfg.n_steps - step) / (cfg.n_steps - decay_start))
    return cfg.lr * warm * decay


def sparsity_lambda_at(step: int, cfg: TrainConfig) -> float:
    """lambda ramps linearly from 0 to `sparsity_coef` over the run."""
    return cfg.sparsity_coef * min(1.0, step / max(1, cfg.n_steps - 1))


def normalise(model: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor):
    return (
        x.float() * model.input_scale[None, :, None],
        y.float() * model.output_scale[None, :, None],
    )


def penalty_terms(
    acts: torch.Tensor, h: torch.Tensor, threshold: torch.Tensor, norms: torch.Tensor, c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The JumpReLU loss's sparsity term sum tanh(c * a * ||W_dec||) and pre-activation term
    sum relu(threshold - h) * ||W_dec|| (summed over layers and features, averaged over
    tokens), in float32. Eager, each is several passes over the (n_layers, n_tokens, d_tc)
    tensors forward and backward, and saves float32 copies of them; `jumprelu_terms`
    fuses them with the activation."""
    sparsity = torch.tanh(c * acts.float() * norms).sum(dim=(0, 2)).mean()
    pre_act = (torch.relu(threshold - h.float()) * norms).sum(dim=(0, 2)).mean()
    return sparsity, pre_act


def jumprelu_terms(
    h: torch.Tensor,
    log_threshold: torch.Tensor,
    norms: torch.Tensor,
    bandwidth: float,
    c: float,
    grad_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """From pre-activations h (n_layers, n_tokens, d_tc): the JumpReLU activations with
    the threshold's straight-through gradient (as `clt_ops.jumprelu`), `penalty_terms`,
    and with `grad_mask` the sparse decoder's `clt_ops.needs_grad_mask`, in plain ops so
    that `torch.compile` fuses the whole chain into one loop forward and one backward
    (`compiled_jumprelu_terms`; eager it is ~30 passes over h)."""
    threshold = log_threshold.exp()[:, None]
    acts = jumprelu_ops(h, threshold, bandwidth)
    sparsity, pre_act = penalty_terms(acts, h, threshold, norms, c)
    return acts, sparsity, pre_act, needs_grad_mask(h, threshold.detach(), bandwidth) if grad_mask else None


@functools.cache
def compiled_jumprelu_terms():
    """`jumprelu_terms` compiled once per process (shapes are fixed within a run)."""
    return torch.compile(jumprelu_terms, dynamic=False)


COMPILE_MIN_VALUES = 1 << 22
"""`train.compile: auto` compiles when a step has this many (layer, token, feature) values:
below it the compile (~15-60 s) costs more than it saves (tiny runs, tests)."""


def compile_pays(cfg: TrainConfig, n_layers: int, device: torch.device) -> bool:
    """`train.compile`, or for `auto`: a big enough step and a compiler for `device`."""
    if cfg.compile != "auto":
        return cfg.compile
    if cfg.activation != "jumprelu" or cfg.batch_size * n_layers * cfg.d_transcoder < COMPILE_MIN_VALUES:
        return False
    if device.type == "cuda":
        return True
    # Inductor builds a C++ extension for the CPU: it needs a compiler and Python's headers.
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which(os.environ.get("CXX", "g++")) is not None and headers.is_file()


def loss_terms(
    model: CrossLayerTranscoder,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lam: float,
    cfg: TrainConfig,
    bandwidth: float,
    sparse: bool = False,
    compiled: bool = False,
) -> dict[str, torch.Tensor]:
    """The paper's loss on normalised (x, y), each (n_tokens, n_layers, d_model), decoding
    with the token-level sparse decoder when `sparse`, the JumpReLU activation and its loss
    terms fused by `torch.compile` when `compiled` (`jumprelu_terms`).

    The transcoder computes in `cfg.compute_dtype` (bfloat16: its float32 parameters cast
    once per step; every matmul accumulates in float32); the threshold, the loss terms and
    the optimizer stay float32."""
    x = x.to(torch_dtype(cfg.compute_dtype))
    jumprelu = model.shape.activation == "jumprelu"
    penalties = None
    norms, W_dec = model.decoder_weights(x.dtype)
    norms = norms[:, None]  # (n_layers, 1, d_tc), fp32
    if jumprelu and compiled:
        h = model.pre_acts(x)
        acts, *penalties, grad_mask = compiled_jumprelu_terms()(
            h, model.log_threshold, norms, bandwidth, cfg.sparsity_c, sparse
        )
        recon = model.decode(acts, sparse=sparse, grad_mask=grad_mask, weights=W_dec)
    else:
        h, acts, recon = model(x, bandwidth=bandwidth, sparse=sparse, weights=W_dec)
        if jumprelu:
            penalties = penalty_terms(acts, h, model.threshold[:, None], norms, cfg.sparsity_c)
    mse = F.mse_loss(recon.float(), y, reduction="sum") / len(y)
    terms = {"mse": mse, "acts": acts.detach()}
    total = mse
    if cfg.layer0_weight != 1:
        layer0 = F.mse_loss(recon[:, 0].float(), y[:, 0], reduction="sum") / len(y)
        total = total + (cfg.layer0_weight - 1) * layer0
    if penalties is not None:
        sparsity, pre_act = penalties
        total = total + lam * sparsity + cfg.pre_act_coef * pre_act
        terms.update(sparsity=sparsity, pre_act=pre_act)
    terms["total"] = total
    return terms


def build_transcoder(store: ActivationStore, cfg: TrainConfig) -> CrossLayerTranscoder:
    shape = CLTShape(
        n_layers=store.schema.n_layers,
        d_model=store.schema.d_model,
        d_transcoder=cfg.d_transcoder,
        kind=cfg.kind,
        activation=cfg.activation,
        k=cfg.k,
    )
    model = CrossLayerTranscoder(shape)
    if cfg.encoder_init == "transpose":
        with torch.no_grad():
            own = torch.stack([W[:, 0, :] for W in model.W_dec])  # (n_layers, d_tc, d_model)
            columns = own.transpose(1, 2)  # (n_layers, d_model, d_tc)
            scale = model.W_enc.norm(dim=1, keepdim=True) / columns.norm(dim=1, keepdim=True)
            model.W_enc.copy_(columns * scale)
    return model


SPARSE_MIN_D_TRANSCODER = 2048
"""`sparse_decoder: auto` always decodes dense below this many features per layer (there
the dense step measured faster at every L0, and a fixed choice keeps small runs
bit-for-bit reproducible); from it on it times both (`decoder_seconds`)."""
RETIME_L0_FACTOR = 2.0
"""`auto` times the decoders again once L0 has moved this factor from where they were last timed."""
SWITCH_MARGIN = 0.9
"""... and switches only to a decoder that took less than this fraction of the other's time."""


def decoder_seconds(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, lam: float) -> dict[str, float]:
    """Seconds of the step's forward and backward pass on (x, y) with the dense and with
    the sparse decoder, each the faster of two runs (the first of each pays allocation and
    compilation), gradients discarded; under torchrun the slowest rank's, so that every
    rank picks the same."""
    model, device = trainer.model, trainer.device
    seconds = {"dense": math.inf, "sparse": math.inf}
    for name in ["dense", "sparse"] * 2:
        trainer.optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        start = time.perf_counter()
        terms = loss_terms(
            model,
            x,
            y,
            lam=lam,
            cfg=trainer.cfg,
            bandwidth=trainer.bandwidth,
            sparse=name == "sparse",
            compiled=trainer.compiled,
        )
        terms["total"].backward()
        synchronize(device)
        seconds[name] = min(seconds[name], time.perf_counter() - start)
    trainer.optimizer.zero_grad(set_to_none=True)
    if model.feature_shard is not None:
        both = torch.tensor([seconds["dense"], seconds["sparse"]], device=device)
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        seconds = dict(zip(("dense", "sparse"), both.tolist()))
    return seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_gradients(model: CrossLayerTranscoder, stats: torch.Tensor) -> torch.Tensor:
    """After the backward pass of a feature shard: one all-reduce that averages the
    gradients of the replicated parameters (`b_dec`) over the ranks and sums `stats` (a
    vector of per-rank partial sums); returns the summed `stats`. On a whole transcoder,
    `stats` unchanged."""
    if model.feature_shard is None:
        return stats
    replicated = [p for name, p in model.named_parameters() if model.feature_dim(name) is None]
    grads = [p.grad.flatten() for p in replicated]
    buffer = torch.cat([*grads, stats.to(grads[0].dtype)])
    torch.distributed.all_reduce(buffer)
    offset = 0
    for p, g in zip(replicated, grads):
        p.grad.copy_((buffer[offset : offset + len(g)] / model.feature_shard.size).view_as(p.grad))
        offset += len(g)
    return buffer[offset:]


def gradient_sq_norm(model: CrossLayerTranscoder, *, sharded: bool) -> torch.Tensor:
    """The squared gradient norm of the sharded parameters (`sharded`) or of the others."""
    grads = [
        p.grad.float().pow(2).sum()
        for name, p in model.named_parameters()
        if p.grad is not None and (model.feature_dim(name) is not None) == sharded
    ]
    return torch.stack(grads).sum() if grads else torch.zeros((), device=model.b_dec.device)


class Trainer:
    """One training run: the transcoder, its optimizer and the schedules.

    `Trainer(store, cfg, device=...)` builds and initialises the transcoder (steps 1-2);
    `train_step(batch)` is one optimisation step at the current step's learning rate and
    sparsity lambda; `fit` runs (or resumes) the whole run with checkpoints (step 3);
    `state_dict` / `load_state_dict` are what a checkpoint holds. With `here` a rank of a
    feature-parallel run (`pipeline.distributed.world`), it trains that rank's shard.
    """

    def __init__(
        self, store: ActivationStore, cfg: TrainConfig, *, device: torch.device, here: World = World()
    ):
        model = build_transcoder(store, cfg)
        init = sample_rows(store, "train", cfg.val_fraction, 4096, cfg.max_norm_ratio)
        fit_scales(model, init)
        x_init, _ = normalise(model, init["resid_mid"], init["mlp_out"])  # also calibrates topk
        self._start(model, cfg, x_init, device, here)

    @classmethod
    def from_inputs(
        cls,
        model: CrossLayerTranscoder,
        cfg: TrainConfig,
        x_init: torch.Tensor,
        *,
        device: torch.device,
        here: World = World(),
    ) -> Trainer:
        """A trainer for `model` (its scales already set) initialised from normalised inputs
        `x_init` (n_tokens, n_layers, d_model), without a store (`python -m bench.train --full-step`)."""
        trainer = cls.__new__(cls)
        trainer._start(model, cfg, x_init, device, here)
        return trainer

    def _start(
        self, model: CrossLayerTranscoder, cfg: TrainConfig, x_init: torch.Tensor, device, here: World
    ) -> None:
        self.cfg, self.device, self.x_init, self.here = cfg, device, x_init, here
        # the whole transcoder is initialised on every rank (the same on all: same seed and
        # sample; the STE bandwidth is a statistic of all features), then sliced
        self.bandwidth = init_encoder(model, x_init, cfg)
        if here.distributed:
            model = model.shard(here.rank, here.size)
        self.model = model
        model.to(device)
        self.optimizer = adam(model.parameters(), cfg.lr, device)
        self.compiled = compile_pays(cfg, model.shape.n_layers, device)
        self.steps_done = 0
        self.history: list[dict] = []

    def pick_decoder(self, x: torch.Tensor, y: torch.Tensor, lam: float) -> dict:
        """How this step decodes: {"sparse_decoder": bool}, from `train.sparse_decoder`, or
        for `auto` by measured cost: dense below `SPARSE_MIN_D_TRANSCODER` features; else
        the last timed choice, timed again (`decoder_seconds`, kept in the step's record
        with its L0 as `timed_l0`) at the first step and whenever the last step's L0 has moved
        `RETIME_L0_FACTOR` from there, switching only past `SWITCH_MARGIN`. The choices
        are kept in the run's history, so a resumed run goes on from the same one."""
        cfg = self.cfg
        if cfg.sparse_decoder != "auto":
            return {"sparse_decoder": cfg.sparse_decoder}
        if cfg.d_transcoder < SPARSE_MIN_D_TRANSCODER:
            return {"sparse_decoder": False}
        timed = next((r for r in reversed(self.history) if "decoder_seconds" in r), None)
        l0 = self.history[-1]["l0"] if self.history else None
        if timed is not None:
            ratio = max(l0, 1e-6) / max(timed["timed_l0"], 1e-6)
            if 1 / RETIME_L0_FACTOR < ratio < RETIME_L0_FACTOR:
                return {"sparse_decoder": self.history[-1]["sparse_decoder"]}
        seconds = decoder_seconds(self, x, y, lam)
        if timed is None:
            sparse = seconds["sparse"] < seconds["dense"]
        else:
            sparse = self.history[-1]["sparse_decoder"]
            current, other = ("sparse", "dense") if sparse else ("dense", "sparse")
            if seconds[other] < SWITCH_MARGIN * seconds[current]:
                sparse = not sparse
        return {"sparse_decoder": sparse, "decoder_seconds": seconds}

    def state_dict(self) -> dict:
        """What a checkpoint holds (`Checkpoint.save`'s arguments): `tensors`, by name this
        rank's slice of the model's parameters and buffers and of each parameter's Adam
        moments (zeros before the first step), with `feature_dims` (None: the same on every
        rank) and the slice's `features` [start, stop); `optimizer`, each parameter's Adam
        `step` count; and `step`, `history`, `bandwidth`."""
        tensors, feature_dims = {}, {}
        for name, t in itertools.chain(self.model.named_parameters(), self.model.named_buffers()):
            tensors[f"model.{name}"], feature_dims[f"model.{name}"] = t.detach(), self.model.feature_dim(name)
        moments, optimizer = adam_tensors(self.optimizer, dict(self.model.named_parameters()))
        tensors.update(moments)
        for name, _ in self.model.named_parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                feature_dims[f"optimizer.{name}.{key}"] = self.model.feature_dim(name)
        shard = self.model.feature_shard
        features = (shard.start, shard.stop) if shard is not None else (0, self.model.shape.d_transcoder)
        return {
            "tensors": tensors,
            "feature_dims": feature_dims,
            "features": features,
            "optimizer": optimizer,
            "step": self.steps_done,
            "history": self.history,
            "bandwidth": self.bandwidth,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, what `Checkpoint.load` read (this rank's slices)."""
        tensors = state["tensors"]
        for name, t in itertools.chain(self.model.named_parameters(), self.model.named_buffers()):
            t.copy_(tensors[f"model.{name}"])
        load_adam(self.optimizer, dict(self.model.named_parameters()), tensors, state["optimizer"])
        self.steps_done, self.history, self.bandwidth = state["step"], state["history"], state["bandwidth"]

    def train_step(self, batch: Batch) -> dict:
        """One optimisation step on `batch`; returns (and records) its loss, NMSE and L0."""
        cfg, model, step = self.cfg, self.model, self.steps_done
        x, y = normalise(model, *batch.on(self.device))
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        lam = sparsity_lambda_at(step, cfg)
        decoder = self.pick_decoder(x, y, lam)
        sparse = decoder["sparse_decoder"]
        terms = loss_terms(
            model, x, y, lam=lam, cfg=cfg, bandwidth=self.bandwidth, sparse=sparse, compiled=self.compiled
        )
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        acts = terms["acts"]
        l0 = torch.count_nonzero(acts) / (acts.numel() / acts.shape[-1])  # per layer and token
        loss = terms["total"]
        if model.feature_shard is not None:  # the per-rank terms summed over the ranks' features
            zero = torch.zeros((), device=l0.device)
            parts = [terms.get("sparsity", zero), terms.get("pre_act", zero), l0, zero]
            if cfg.max_grad_norm > 0:
                parts[3] = gradient_sq_norm(model, sharded=True)
            sparsity, pre_act, l0, sq_norm = sync_gradients(model, torch.stack([p.detach() for p in parts]))
            loss = terms["mse"] + lam * sparsity + cfg.pre_act_coef * pre_act if "sparsity" in terms else loss
            if cfg.max_grad_norm > 0:
                clip_gradients(model, cfg.max_grad_norm, sq_norm + gradient_sq_norm(model, sharded=False))
        elif cfg.max_grad_norm > 0:
            sq_norm = gradient_sq_norm(model, sharded=True) + gradient_sq_norm(model, sharded=False)
            clip_gradients(model, cfg.max_grad_norm, sq_norm)
        self.optimizer.step()
        variance = (y - y.mean(0)).pow(2).sum(dim=(1, 2)).mean().item()
        record = {
            "step": step,
            "loss": loss.item(),
            "mse": terms["mse"].item(),
            "nmse": terms["mse"].item() / variance,
            "l0": l0.item(),
            "lambda": lam,
            "lr": lr_at(step, cfg),
            **decoder,
        }
        if "decoder_seconds" in decoder:
            record["timed_l0"] = record["l0"]
        self.history.append(record)
        self.steps_done += 1
        return record

    def fit(self, loader: ActivationLoader, checkpoint: Checkpoint, *, progress: bool = True) -> list[dict]:
        """Run (or resume from `checkpoint`) to `cfg.n_steps`; returns the per-step history."""
        cfg = self.cfg
        state = checkpoint.load(self.state_dict())
        if state is not None:
            self.load_state_dict(state)
            logger.info("resuming training at step %d/%d", self.steps_done, cfg.n_steps)
        bar = tqdm(
            total=cfg.n_steps,
            initial=self.steps_done,
            desc="train",
            unit="step",
            disable=not (progress and self.here.main),
        )
        with contextlib.closing(loader.batches(self.steps_done)) as batches:  # stops the read-ahead thread
            for batch in itertools.islice(batches, cfg.n_steps - self.steps_done):
                record = self.train_step(batch)
                bar.update(1)
                bar.set_postfix(nmse=f"{record['nmse']:.3f}", l0=f"{record['l0']:.1f}")
                if self.steps_done % cfg.checkpoint_every == 0 or self.steps_done == cfg.n_steps:
                    checkpoint.save(**self.state_dict())
                    fault(f"train-step-{self.steps_done}")  # tests: a rank killed after a checkpoint
        bar.close()
        return self.history

    def trained_model(self) -> CrossLayerTranscoder:
        """The whole transcoder on CPU, JumpReLU (topk / batchtopk thresholds calibrated), ready
        to export; on a feature shard, gathered from every rank (all ranks call this)."""
        model = self.model.gather().cpu() if self.model.feature_shard is not None else self.model.cpu()
        if self.cfg.activation != "jumprelu":
            calibrate_thresholds(model, self.x_init)
            model.shape = CLTShape(**{**asdict(model.shape), "activation": "jumprelu"})
        return model


@torch.no_grad()
def clip_gradients(model: CrossLayerTranscoder, max_norm: float, sq_norm: torch.Tensor) -> None:
    """Scale every gradient by max_norm / ||g|| where the global norm ||g|| = sqrt(`sq_norm`)
    exceeds `max_norm` (as `torch.nn.utils.clip_grad_norm_`, but with the norm of the whole
    transcoder's gradient when `model` is one feature shard)."""
    coef = (max_norm / (sq_norm.sqrt() + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))


@torch.no_grad()
def validate(model: CrossLayerTranscoder, sample: dict[str, torch.Tensor], batch_size: int = 1024) -> dict:
    """Per-layer NMSE (FVU), mean L0 and dead-feature fraction on held-out rows (raw space)."""
    L = model.shape.n_layers
    sq_err = torch.zeros(L, dtype=torch.float64)
    fired = torch.zeros(L, model.shape.d_transcoder, dtype=torch.bool)
    l0 = torch.zeros(L, dtype=torch.float64)
    y_all = sample["mlp_out"]
    total_var = (y_all - y_all.mean(0)).pow(2).sum(dim=(0, 2)).double()  # (n_layers,)
    n = len(y_all)
    for b in range(0, n, batch_size):
        x, y = normalise(model, sample["resid_mid"][b : b + batch_size], y_all[b : b + batch_size])
        _, acts, recon = model(x)
        recon_raw = recon / model.output_scale[None, :, None]
        y_raw = y / model.output_scale[None, :, None]
        sq_err += (recon_raw - y_raw).pow(2).sum(dim=(0, 2)).double()
        fired |= (acts != 0).any(1)
        l0 += (acts != 0).sum(dim=(1, 2)).double()
    nmse = (sq_err / total_var).tolist()
    l0 = (l0 / n).tolist()
    dead = (~fired).float().mean(1).tolist()
    return {
        "n_tokens": n,
        "mean": {
            "nmse": float(np.mean(nmse)),
            "l0": float(np.mean(l0)),
            "dead_fraction": float(np.mean(dead)),
        },
        "per_layer": [
            {"layer": layer, "nmse": nmse[layer], "l0": l0[layer], "dead_fraction": dead[layer]}
            for layer in range(L)
        ],
    }


@torch.no_grad()
def calibrate_thresholds(model: CrossLayerTranscoder, x: torch.Tensor) -> None:
    """For topk / batchtopk: per-layer JumpReLU thresholds giving the same mean L0 (k) on `x`."""
    h = model.pre_acts(x)  # (n_layers, n_tokens, d_tc)
    _, n_tokens, d = h.shape
    k = model.shape.k
    flat = h.reshape(model.shape.n_layers, -1)
    kth = flat.topk(k * n_tokens, dim=-1).values[:, -1]  # the (k * n_tokens)-th largest per layer
    threshold = kth.clamp_min(1e-6)  # JumpReLU thresholds must be positive (a ReLU below)
    model.log_threshold.copy_(threshold.log()[:, None].expand(-1, d))


def write_metrics(folder: Path, metrics: dict, history: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(folder / "train_curve.csv", "w", newline="") as f:
        fields = [
            "step",
            "loss",
            "mse",
            "nmse",
            "l0",
            "lambda",
            "lr",
        ]  # the decoder timings stay in the checkpoint
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def _same_model(a: str, b: str) -> bool:
    """Whether two `model.name` values name the same model (paths compared resolved)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_store_model(store: ActivationStore, model_name: str) -> None:
    """A clear error unless `store` was dumped from `model_name` (`model.name`)."""
    if not _same_model(store.schema.model, model_name):
        raise ValueError(
            f"activation store {store.path} was dumped from model {store.schema.model!r} "
            f"({store.schema.architecture}, {store.schema.n_layers} layers, d_model {store.schema.d_model}), "
            f"but `model.name` is {model_name!r}; re-run `dvc repro dump` for this model, or set "
            f"`model.name` back to {store.schema.model!r}"
        )


def validate_and_export(
    params: Params, store: ActivationStore, model: CrossLayerTranscoder, history: list[dict], extra: dict
) -> dict:
    """The end of the `train` stage: validate `model` on 8,192 validation rows, export it to
    `paths.transcoder`, and write its metrics (with `extra`) and the curve of `history`."""
    metrics = {**validate(model, sample_rows(store, "val", params.train.val_fraction, 8192)), **extra}
    logger.info("validation: %s", metrics["mean"])
    # `scan` (where the frontend finds the `pack` stage's features): a portable name made
    # from `model.name` by `export_transcoder`, e.g. ./feature-data/smollm2-135m-instruct.
    export_transcoder(model, params.paths.transcoder, model_name=params.model.name)
    write_metrics(Path(params.paths.metrics), metrics, history)
    return metrics


def run(params: Params, *, progress: bool = True) -> dict:
    """The `train` stage: fit the transcoder, validate it, export it for circuit-tracer."""
    cfg = params.train
    torch.manual_seed(cfg.seed)
    keep_freed_memory()  # each step's large tensors reuse the last step's pages
    device = resolve_device(params.runtime.device)
    here = world(device)  # under torchrun: this rank of a feature-parallel run
    device = local_device(device)
    store = ActivationStore(params.paths.activations)
    check_store_model(store, params.model.name)
    out = Path(params.paths.transcoder)
    work = out.with_name(out.name + ".partial")
    loader = ActivationLoader(
        store,
        batch_size=cfg.batch_size,
        split="train",
        val_fraction=cfg.val_fraction,
        buffer_shards=cfg.buffer_shards,
        seed=cfg.seed,
        max_norm_ratio=cfg.max_norm_ratio,
        decode_on_host=device.type == "cpu",  # a GPU decodes a float8 batch faster, after a smaller copy
    )
    trainer = Trainer(store, cfg, device=device, here=here)
    fingerprint = {"train": asdict(cfg), "store": asdict(store.schema)}
    history = trainer.fit(loader, Checkpoint(work, fingerprint, here), progress=progress)
    model = trainer.trained_model()
    metrics = None
    if here.main:
        if cfg.kl_steps:  # fine-tuned in raw space, as exported, through the spliced model
            from pipeline.finetune import kl_phase, phase_summary  # the language model's imports

            model = raw_space(model)
            # on this process alone: the other ranks wait for the export (`wait_for_ranks`)
            kl_checkpoint = Checkpoint(work / "kl", fingerprint)
            kl_history = kl_phase(
                params, model, "the trained transcoder", checkpoint=kl_checkpoint, progress=progress
            )
            model = model.cpu()
        extra = {"kl_phase": phase_summary(kl_history)} if cfg.kl_steps else {}
        metrics = validate_and_export(params, store, model, history, extra)
        shutil.rmtree(work, ignore_errors=True)
    wait_for_ranks("train: exported")  # rank 0's KL phase and export take minutes
    return broadcast_object(metrics)
