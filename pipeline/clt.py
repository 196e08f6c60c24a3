"""The cross-layer transcoder (CLT) and its per-layer special case (PLT).

Following Ameisen et al., "Circuit Tracing" (2025),
https://transformer-circuits.pub/2025/attribution-graphs/methods.html:

- one encoder per layer l reads that layer's MLP input x_l (`hook_resid_mid`):
  a_l = act(W_enc_l x_l + b_enc_l), with `act` a JumpReLU a = h * (h > threshold);
- every layer l has decoders to all layers l' >= l (`W_dec_l: [d_transcoder, n_layers - l,
  d_model]`), and the reconstruction of the MLP output of layer l' sums the decoders of all
  layers <= l': y_hat_l' = sum_{l <= l'} W_dec_l[:, l' - l]^T a_l + b_dec_l'.
- a per-layer transcoder (`kind="plt"`) is the same model with `n_layers - l` replaced by 1.

Training happens in a normalised space: inputs and targets of layer l are multiplied by
scalars `input_scale[l]`, `output_scale[l]` chosen so that E||x|| = sqrt(d_model); `export`
folds them into the weights so the saved transcoder works on raw activations.

The JumpReLU threshold is trained through a straight-through estimator, and all layers
decode at once, dense or token-level sparse: `pipeline/clt_ops.py`.

Feature (tensor) parallel training (`CrossLayerTranscoder.shard`, `FeatureShard`): each of
N ranks holds a contiguous slice of every layer's features (their encoder columns, biases,
thresholds and decoder rows to every output layer) and a copy of `b_dec`; on the same
batch it encodes its features, decodes them into a partial reconstruction of all layers,
and one all-reduce sums the partials (`clt_ops.sum_partials`). `gather` rebuilds the whole
transcoder. (The feature-parallel CLT of curt-tigges/crosslayer-coding works the same way.)
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from pipeline.atomic import staged
from pipeline.clt_ops import (
    Decode,
    SparseDecode,
    batch_topk_mask,
    decoder_weights,
    global_batch_topk_mask,
    global_topk_mask,
    jumprelu,
    needs_grad_mask,
    sum_partials,
    topk_mask,
)


@dataclass(frozen=True)
class CLTShape:
    """What fixes the transcoder's parameters."""

    n_layers: int
    d_model: int
    d_transcoder: int
    """Features per layer."""
    kind: Literal["clt", "plt"] = "clt"
    activation: Literal["jumprelu", "topk", "batchtopk"] = "jumprelu"
    k: int = 32
    """Active features per layer and token for `topk` / `batchtopk`."""

    def n_out(self, layer: int) -> int:
        """How many layers the decoder of `layer` writes to."""
        return self.n_layers - layer if self.kind == "clt" else 1


@dataclass(frozen=True)
class FeatureShard:
    """Features [start, stop) of every layer, the part of the transcoder one rank of a
    feature-parallel run holds (`CrossLayerTranscoder.shard`)."""

    rank: int
    size: int
    """Ranks in the run; each holds `d_transcoder / size` features per layer."""
    start: int
    stop: int

    SHARDED = {"W_enc": 2, "b_enc": 1, "log_threshold": 1}
    """The sharded parameters besides the decoders (`W_dec.{l}`, dim 0), by name: their
    feature dim. The others (`b_dec`, the scales) are the same on every rank."""


class CrossLayerTranscoder(nn.Module):
    def __init__(self, shape: CLTShape, *, shard: FeatureShard | None = None):
        super().__init__()
        self.shape = shape
        self.feature_shard = shard
        L, d = shape.n_layers, shape.d_model
        F = shape.d_transcoder if shard is None else shard.stop - shard.start  # features held here
        self.W_enc = nn.Parameter(torch.empty(L, d, F))
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        self.log_threshold = nn.Parameter(torch.zeros(L, F))  # fp32 always
        self.W_dec = nn.ParameterList([nn.Parameter(torch.empty(F, shape.n_out(l), d)) for l in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.register_buffer("input_scale", torch.ones(L))
        self.register_buffer("output_scale", torch.ones(L))
        if shard is None:  # a shard is filled by `shard` (drawing here would shift the RNG)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's init: W_enc ~ U(+-1/sqrt(d_transcoder)), W_dec ~ U(+-1/sqrt(n_layers d_model))."""
        L, d, F = self.shape.n_layers, self.shape.d_model, self.shape.d_transcoder
        with torch.no_grad():
            bound = 1 / math.sqrt(F)
            self.W_enc.uniform_(-bound, bound)
            bound = 1 / math.sqrt(L * d)
            for W in self.W_dec:
                W.uniform_(-bound, bound)

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def decoder_norms(self) -> torch.Tensor:
        """||W_dec_f|| over all of a feature's output layers concatenated: (n_layers, d_transcoder)."""
        return torch.stack([W.flatten(1).norm(dim=1) for W in self.W_dec])

    def decoder_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`decoder_norms` and each layer's decoder as `decode` takes it (`weights`), from one
        autograd op whose backward makes one pass over the decoder (`clt_ops.decoder_weights`):
        what a training step needs."""
        return decoder_weights(list(self.W_dec), dtype)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations h: x (n_tokens, n_layers, d_model) -> (n_layers, n_tokens, d_tc)."""
        return torch.einsum("tld,ldf->ltf", x, self.W_enc.to(x.dtype)) + self.b_enc.to(x.dtype)[:, None]

    def activate(self, h: torch.Tensor, bandwidth: float = 0.0) -> torch.Tensor:
        """Feature activations from pre-activations, per `shape.activation`."""
        kind = self.shape.activation
        if kind == "jumprelu":
            threshold = self.threshold[:, None]  # (n_layers, 1, d_tc)
            if bandwidth > 0 and torch.is_grad_enabled():
                return jumprelu(h, threshold, bandwidth)
            return h * (h > threshold.to(h.dtype))
        if self.feature_shard is None:
            mask = topk_mask(h, self.shape.k) if kind == "topk" else batch_topk_mask(h, self.shape.k)
        else:  # the top features among every rank's
            select = global_topk_mask if kind == "topk" else global_batch_topk_mask
            mask = select(h, self.shape.k)
        return torch.relu(h) * mask

    def decode(
        self,
        acts: torch.Tensor,
        *,
        sparse: bool = False,
        grad_mask: torch.Tensor | None = None,
        weights: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Every layer's MLP output: acts (n_layers, n_tokens, d_tc) -> (n_tokens, n_layers, d_model);
        on a `shard`, acts are its features' and the partial outputs of all ranks are summed.

        `sparse` touches only the nonzero (token, feature) pairs (`pipeline.clt_ops.SparseDecode`); it pays
        when L0 is a small fraction of d_transcoder (`python -m bench.train`). Its gradient
        with respect to `acts` is computed only where `grad_mask` (default: `acts != 0`) is
        true, and is 0 elsewhere. `weights`: the decoders already in the dtype of `acts`, from
        `decoder_weights` (default: cast here).
        """
        L, n_tokens, _ = acts.shape
        d = self.shape.d_model
        if weights is None:  # (d_tc, n_out * d_model) each
            weights = [W.to(acts.dtype).flatten(1) for W in self.W_dec]
        W_dec = weights
        if sparse:
            out = SparseDecode.apply(acts, grad_mask, d, *W_dec).view(n_tokens, L, d)
        else:
            out = Decode.apply(acts, d, *W_dec).view(n_tokens, L, d)
        if self.feature_shard is not None:  # this rank's features' part of the reconstruction
            out = sum_partials(out)
        return out + self.b_dec.to(acts.dtype)

    def forward(
        self,
        x: torch.Tensor,
        *,
        bandwidth: float = 0.0,
        sparse: bool = False,
        weights: Sequence[torch.Tensor] | None = None,
    ):
        """x (n_tokens, n_layers, d_model) -> pre-activations and activations (n_layers, n_tokens,
        d_tc), reconstruction (n_tokens, n_layers, d_model); `weights` as `decode`'s."""
        h = self.pre_acts(x)
        acts = self.activate(h, bandwidth)
        grad_mask = None
        if sparse and self.shape.activation == "jumprelu" and bandwidth > 0 and torch.is_grad_enabled():
            # the threshold's STE needs dL/da at inactive features near their threshold too
            grad_mask = needs_grad_mask(h, self.threshold[:, None], bandwidth)
        return h, acts, self.decode(acts, sparse=sparse, grad_mask=grad_mask, weights=weights)

    def config_dict(self) -> dict:
        return asdict(self.shape)

    # --- feature parallel ------------------------------------------------------------------

    @staticmethod
    def feature_dim(name: str) -> int | None:
        """The feature dim of parameter or buffer `name` (None: the same on every rank)."""
        if name.startswith("W_dec."):
            return 0
        return FeatureShard.SHARDED.get(name)

    @torch.no_grad()
    def shard(self, rank: int, size: int) -> CrossLayerTranscoder:
        """A copy holding rank `rank` of `size`'s contiguous slice of every layer's features
        (and all of `b_dec` and the scales); a clear error unless `size` divides d_transcoder."""
        F = self.shape.d_transcoder
        if F % size:
            raise ValueError(
                f"`train.d_transcoder` ({F}) must be a multiple of the number of processes ({size}) "
                "for feature-parallel training; change one of them"
            )
        start, stop = rank * F // size, (rank + 1) * F // size
        part = CrossLayerTranscoder(self.shape, shard=FeatureShard(rank, size, start, stop))
        own = dict(itertools.chain(self.named_parameters(), self.named_buffers()))
        for name, t in itertools.chain(part.named_parameters(), part.named_buffers()):
            dim = self.feature_dim(name)
            t.copy_(own[name] if dim is None else own[name].narrow(dim, start, stop - start))
        return part

    @torch.no_grad()
    def gather(self) -> CrossLayerTranscoder:
        """The whole transcoder from every rank's shard (a collective: all ranks call it), on the CPU."""
        if self.feature_shard is None:
            return self
        whole = CrossLayerTranscoder(self.shape)
        own = dict(itertools.chain(self.named_parameters(), self.named_buffers()))
        for name, t in itertools.chain(whole.named_parameters(), whole.named_buffers()):
            dim = self.feature_dim(name)
            local = own[name].detach()
            if dim is None:
                t.copy_(local)
                continue
            parts = [torch.empty_like(local) for _ in range(self.feature_shard.size)]
            dist.all_gather(parts, local.contiguous())
            t.copy_(torch.cat(parts, dim))
        return whole

    # --- inference on raw activations (an exported transcoder, `load_transcoder`) ---------

    def source_layers(self, target: int) -> range:
        """The layers whose decoders write to `target`: all layers <= target (clt), or target (plt)."""
        return range(target + 1) if self.shape.kind == "clt" else range(target, target + 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Every layer's features: x (n_tokens, n_layers, d_model) -> (n_layers, n_tokens, d_tc)."""
        return self.activate(self.pre_acts(x))

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """One layer's features from its MLP input (JumpReLU): x (..., d_model) -> (..., d_tc)."""
        h = x @ self.W_enc[layer] + self.b_enc[layer]
        return h * (h > self.threshold[layer])

    def decode_layer(
        self, acts: Mapping[int, torch.Tensor] | Sequence[torch.Tensor], target: int
    ) -> torch.Tensor:
        """Reconstruction of layer `target`'s MLP output: sum over source layers l of
        acts[l] @ W_dec[l][:, target - l] + b_dec[target]. acts[l] (..., d_tc) -> (..., d_model)."""
        out = self.b_dec[target]
        for l in self.source_layers(target):
            out = out + acts[l] @ self.W_dec[l][:, target - l if self.shape.kind == "clt" else 0]
        return out

    def decode_from(self, acts: torch.Tensor, layer: int, targets: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """Layer `layer`'s features' terms of the reconstructions of `targets` (layers it writes
        to), in one matmul: acts (..., d_tc) -> one (..., d_model) per target, without b_dec.

        `decode_layer` with gradients selects one block of W_dec[layer] per target, and the
        backward pass of each selection writes a zero-filled gradient of the whole W_dec[layer];
        here each layer's decoder has one (sliced or whole) use and one gradient."""
        cols = [t - layer if self.shape.kind == "clt" else 0 for t in targets]
        W = self.W_dec[layer]
        if cols != list(range(W.shape[1])):
            W = W[:, cols]
        return (acts @ W.flatten(1)).split(self.shape.d_model, dim=-1)

    def check_fits(self, n_layers: int, d_model: int, *, where: str, other: str) -> None:
        """A clear error unless this transcoder (loaded from `where`) has the `n_layers` and
        `d_model` of `other` (a model or an activation store, described for the message)."""
        shape = self.shape
        if (shape.n_layers, shape.d_model) != (n_layers, d_model):
            raise ValueError(
                f"transcoder {where} has n_layers={shape.n_layers}, d_model={shape.d_model}, but "
                f"{other} has n_layers={n_layers}, d_model={d_model}: it was trained for another "
                "model; re-run `dvc repro train` or point `paths.transcoder` at one for this model"
            )

    def check_raw(self, where: str) -> None:
        """A clear error unless this is a raw-space JumpReLU transcoder (what `export` writes)."""
        if self.shape.activation != "jumprelu":
            raise ValueError(f"transcoder {where} uses {self.shape.activation}; export it (JumpReLU) first")
        if not (bool((self.input_scale == 1).all()) and bool((self.output_scale == 1).all())):
            raise ValueError(
                f"transcoder {where} works in a normalised space; use the one `load_transcoder` reads "
                "back from an exported folder (raw space)"
            )


HOOKS = {"feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}


@torch.no_grad()
def raw_space_weights(model: CrossLayerTranscoder) -> dict[str, list[torch.Tensor]]:
    """The weights with the normalisation folded in, so they act on raw activations.

    x_hat = s_in x  =>  W_enc_raw = s_in W_enc;  y = y_hat / s_out  =>  each decoder slice
    writing to layer l' and b_dec[l'] are divided by s_out[l'].
    """
    s_in, s_out = model.input_scale.float(), model.output_scale.float()
    L = model.shape.n_layers
    W_dec = []
    for l, W in enumerate(model.W_dec):
        targets = torch.arange(l, l + W.shape[1]) if model.shape.kind == "clt" else torch.tensor([l])
        W_dec.append((W.float() / s_out[targets][None, :, None]).contiguous())
    return {
        "W_enc": [(model.W_enc[l].float() * s_in[l]).t().contiguous() for l in range(L)],
        "b_enc": [model.b_enc[l].float().contiguous() for l in range(L)],
        "threshold": [model.threshold[l].float().contiguous() for l in range(L)],
        "b_dec": [(model.b_dec[l].float() / s_out[l]).contiguous() for l in range(L)],
        "W_dec": W_dec,
    }


def export_transcoder(
    model: CrossLayerTranscoder, out: str | Path, *, model_name: str, scan: str | None = None
):
    """Write circuit-tracer's on-disk format (docs/formats.md, "Transcoder folder"), atomically.

    `clt`: `W_enc_{i}.safetensors` (W_enc_i [d_tc, d_model], b_enc_i, b_dec_i, threshold_i)
    and `W_dec_{i}.safetensors` (W_dec_i [d_tc, n_layers - i, d_model]).
    `plt`: `layer_{i}.safetensors` (W_enc, W_dec [d_tc, d_model], b_enc, b_dec,
    activation_function.threshold). Plus `config.yaml`.

    Its `scan` (where the frontend asks for feature examples) is a portable name, never a
    path (docs/formats.md): by default `./feature-data/<name>` with <name> the model's name
    without folders or `.gguf` (`smollm2-135m-instruct`, `org/SmolLM2` -> `SmolLM2`).
    """
    import yaml
    from safetensors.torch import save_file

    if scan is None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model_name).name.removesuffix(".gguf")).strip(".-")
        scan = f"./feature-data/{name or 'model'}"
    elif os.path.isabs(scan):
        raise ValueError(
            f"`scan` must be a portable name such as ./feature-data/<name>, not the path {scan!r}"
        )
    if model.shape.activation != "jumprelu":
        raise ValueError("only JumpReLU transcoders can be exported; calibrate thresholds first")
    w = raw_space_weights(model)
    config = {
        "model_kind": "cross_layer_transcoder" if model.shape.kind == "clt" else "transcoder_set",
        **HOOKS,
        "model_name": model_name,
        "scan": scan,  # always set: circuit-tracer would fall back to the folder's own path
    }
    out = Path(out)
    with staged(out, suffix=".export", folder=True) as tmp:
        for i in range(model.shape.n_layers):
            for filename, tensors in _layer_files(w, i, model.shape.kind).items():
                save_file(tensors, tmp / filename)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def _layer_files(w: dict[str, list[torch.Tensor]], i: int, kind: str) -> dict[str, dict[str, torch.Tensor]]:
    """Layer `i`'s files of an exported folder, by name: their tensors (see `export_transcoder`)."""
    if kind == "clt":
        return {
            f"W_enc_{i}.safetensors": {
                f"W_enc_{i}": w["W_enc"][i],
                f"b_enc_{i}": w["b_enc"][i],
                f"b_dec_{i}": w["b_dec"][i],
                f"threshold_{i}": w["threshold"][i],
            },
            f"W_dec_{i}.safetensors": {f"W_dec_{i}": w["W_dec"][i]},
        }
    return {
        f"layer_{i}.safetensors": {
            "W_enc": w["W_enc"][i],
            "W_dec": w["W_dec"][i][:, 0].contiguous(),
            "b_enc": w["b_enc"][i],
            "b_dec": w["b_dec"][i],
            "activation_function.threshold": w["threshold"][i],
        }
    }


def load_transcoder(folder: str | Path) -> CrossLayerTranscoder:
    """Load an exported folder (either layout) as a raw-space `CrossLayerTranscoder`."""
    import yaml
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{folder} is not a transcoder folder (no config.yaml); run `dvc repro train`"
        )
    config = yaml.safe_load((folder / "config.yaml").read_text())
    kind = {"cross_layer_transcoder": "clt", "transcoder_set": "plt"}.get(config.get("model_kind"))
    if kind is None:
        raise ValueError(f"{folder}/config.yaml has unknown model_kind {config.get('model_kind')!r}")
    n_layers = _check_files(folder, ("W_enc", "W_dec") if kind == "clt" else ("layer",))
    if kind == "clt":
        enc = [load_file(folder / f"W_enc_{i}.safetensors") for i in range(n_layers)]
        dec = [load_file(folder / f"W_dec_{i}.safetensors")[f"W_dec_{i}"] for i in range(n_layers)]
        W_enc = [e[f"W_enc_{i}"] for i, e in enumerate(enc)]
        b_enc = [e[f"b_enc_{i}"] for i, e in enumerate(enc)]
        b_dec = [e[f"b_dec_{i}"] for i, e in enumerate(enc)]
        threshold = [e[f"threshold_{i}"] for i, e in enumerate(enc)]
    else:
        layers = [load_file(folder / f"layer_{i}.safetensors") for i in range(n_layers)]
        W_enc = [t["W_enc"] for t in layers]
        b_enc = [t["b_enc"] for t in layers]
        b_dec = [t["b_dec"] for t in layers]
        threshold = [t["activation_function.threshold"] for t in layers]
        dec = [t["W_dec"][:, None] for t in layers]
    weights = {"W_enc": W_enc, "b_enc": b_enc, "threshold": threshold, "b_dec": b_dec, "W_dec": dec}
    return _from_raw_weights(weights, kind)


def raw_space(model: CrossLayerTranscoder) -> CrossLayerTranscoder:
    """The raw-space transcoder `load_transcoder` would load from `export_transcoder(model)`,
    built in memory (float32, on the CPU)."""
    return _from_raw_weights(raw_space_weights(model), model.shape.kind)


def _from_raw_weights(w: dict[str, list[torch.Tensor]], kind: str) -> CrossLayerTranscoder:
    """A raw-space `CrossLayerTranscoder` from per-layer weights laid out as exported
    (`raw_space_weights`: W_enc[l] (d_tc, d_model), W_dec[l] (d_tc, n_out, d_model))."""
    d_tc, d_model = w["W_enc"][0].shape
    shape = CLTShape(n_layers=len(w["W_enc"]), d_model=d_model, d_transcoder=d_tc, kind=kind)
    model = CrossLayerTranscoder(shape)
    with torch.no_grad():
        model.W_enc.copy_(torch.stack([W.t() for W in w["W_enc"]]))
        model.b_enc.copy_(torch.stack(w["b_enc"]))
        model.b_dec.copy_(torch.stack(w["b_dec"]))
        model.log_threshold.copy_(torch.stack(w["threshold"]).log())
        for W, d in zip(model.W_dec, w["W_dec"]):
            W.copy_(d)
    return model


def _check_files(folder: Path, prefixes: tuple[str, ...]) -> int:
    """The number of layers of an exported folder whose files are `{prefix}_{i}.safetensors`;
    a clear error naming the folder and every missing file unless all are there."""
    indices = {
        int(m.group(1))
        for prefix in prefixes
        for path in folder.glob(f"{prefix}_*.safetensors")
        if (m := re.fullmatch(rf"{prefix}_(\d+)\.safetensors", path.name))
    }
    expected = [f"{p}_{i}.safetensors" for i in range(max(indices, default=-1) + 1) for p in prefixes]
    missing = [name for name in expected if not (folder / name).is_file()]
    if not indices or missing:
        what = ", ".join(missing) if missing else f"any {' or '.join(p + '_*' for p in prefixes)}.safetensors"
        raise FileNotFoundError(
            f"transcoder folder {folder} is incomplete: missing {what}; re-run `dvc repro train` "
            "(or `dvc pull` it)"
        )
    return len(expected) // len(prefixes)
