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

The JumpReLU threshold gets gradients through a straight-through estimator with a
rectangle kernel of width `bandwidth` (Rajamanoharan et al. 2024,
https://arxiv.org/abs/2407.14435): d a / d threshold = -(threshold / bandwidth) *
rect((h - threshold) / bandwidth).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


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


class _JumpReLU(torch.autograd.Function):
    """a = h * (h > threshold), with the rectangle-kernel STE for the threshold."""

    @staticmethod
    def forward(ctx, h, threshold, bandwidth: float):
        mask = h > threshold
        ctx.save_for_backward(h, threshold, mask)
        ctx.bandwidth = bandwidth
        return h * mask

    @staticmethod
    def backward(ctx, grad):
        h, threshold, mask = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_h = grad * mask
        window = ste_window(h, threshold, eps).to(grad.dtype)
        grad_threshold = -(threshold / eps) * window * grad
        grad_threshold = grad_threshold.sum_to_size(threshold.shape)
        return grad_h, grad_threshold, None


def jumprelu(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _JumpReLU.apply(h, threshold, bandwidth)


def ste_window(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Where the threshold's straight-through estimator is nonzero: |h - threshold| < bandwidth / 2.

    There the threshold's gradient needs dL/da even for inactive features (a = 0)."""
    return (h - threshold).abs() < bandwidth / 2


def _topk_mask(h: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the top `k` of the last dim (per layer and token)."""
    idx = h.topk(k, dim=-1).indices
    return torch.zeros_like(h, dtype=torch.bool).scatter_(-1, idx, True)


def _batch_topk_mask(h: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the top `k * n_tokens` of each layer across the batch: h (n_layers, n_tokens, d_tc)."""
    n_layers, n_tokens, _ = h.shape
    flat = h.reshape(n_layers, -1)
    idx = flat.topk(k * n_tokens, dim=-1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True).view_as(h)


class _Decode(torch.autograd.Function):
    """All decoders at once, dense: out (n_tokens, n_layers * d_model) from acts (n_layers, n_tokens, d_tc).

    Layer l's decoder writes the columns of every layer from l on (`n_out * d_model`
    columns), one contiguous column block: each layer is a single in-place `addmm_` into a
    strided view, and the backward pass reads the same blocks of the gradient. Computes in
    the dtype of `acts` and `W_dec` (bfloat16 matmuls accumulate in float32 inside).
    """

    @staticmethod
    def forward(ctx, acts, d_model: int, *W_dec):
        n_layers, n_tokens, _ = acts.shape
        out = acts.new_zeros(n_tokens, n_layers * d_model)
        for l, W in enumerate(W_dec):  # W: (d_tc, n_out * d_model)
            out[:, l * d_model : l * d_model + W.shape[1]].addmm_(acts[l], W)
        ctx.save_for_backward(acts, *W_dec)
        ctx.d_model = d_model
        return out

    @staticmethod
    def backward(ctx, grad):
        acts, *W_dec = ctx.saved_tensors
        d = ctx.d_model
        grad = grad.to(acts.dtype)
        grad_acts = torch.empty_like(acts)
        grad_W = []
        for l, W in enumerate(W_dec):
            g = grad[:, l * d : l * d + W.shape[1]]  # (n_tokens, n_out * d_model)
            torch.mm(g, W.t(), out=grad_acts[l])
            grad_W.append(acts[l].t() @ g)
        return grad_acts, None, *grad_W


def _group_starts(key: torch.Tensor, n_groups: int, n: int) -> torch.Tensor:
    """For a sorted `key` = group * n + item: where each item's run begins, counted from its
    group's start: (n_groups, n)."""
    counts = torch.bincount(key, minlength=n_groups * n).view(n_groups, n)
    return counts.cumsum(1) - counts


@dataclass(frozen=True)
class _Pairs:
    """The (layer, token, feature) triples where a mask (n_layers, n_tokens, d_tc) is true,
    sorted by layer then token, found for all layers at once (few large ops rather than
    many small ones); `offsets[l]` (n_tokens,) is where each token's pairs begin within
    layer l's: the bags of `embedding_bag`."""

    layer: torch.Tensor  # (nnz,)
    token: torch.Tensor  # (nnz,)
    feature: torch.Tensor  # (nnz,)
    sizes: list[int]  # pairs per layer
    offsets: torch.Tensor  # (n_layers, n_tokens)

    @classmethod
    def where(cls, mask: torch.Tensor) -> _Pairs:
        n_layers, n_tokens, _ = mask.shape
        layer, token, feature = mask.nonzero(as_tuple=True)  # row-major: sorted by (layer, token)
        sizes = torch.bincount(layer, minlength=n_layers).tolist()
        return cls(layer, token, feature, sizes, _group_starts(layer * n_tokens + token, n_layers, n_tokens))

    def per_layer(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A (nnz,) tensor split into its layers' parts."""
        return t.split(self.sizes)


class _SparseDecode(torch.autograd.Function):
    """All decoders at once, token-level sparse: out (n_tokens, n_layers * d_model) from
    acts (n_layers, n_tokens, d_tc).

    Per layer, only the nonzero (token, feature) pairs are touched, so the cost scales
    with their number (n_tokens * L0), not with n_tokens * d_transcoder:
    - forward: each token's output sums its active features' decoder rows, weighted by
      their activations (`embedding_bag` with `per_sample_weights`, one bag per token);
    - grad W_dec: each feature's row sums the output gradients of the tokens it is active
      on, weighted by its activations (`embedding_bag` with one bag per feature);
    - grad acts: the dot product of the feature's decoder row with the token's output
      gradient (`embedding_bag`'s own per-sample-weight gradient), at the pairs of
      `grad_mask` (n_layers, n_tokens, d_tc), by default the active ones, and 0 elsewhere.
      Every activation here passes back zero gradient to h where a = 0, but the JumpReLU
      threshold's straight-through estimator also needs dL/da at inactive features just
      below the threshold (`ste_window`), so `CrossLayerTranscoder.forward` adds those.
    It computes in W_dec's dtype (the float32 parameters, autocast off inside): casting
    all of W_dec to bfloat16 would read and write every row, not only the active ones.
    """

    @staticmethod
    def forward(ctx, acts, grad_mask, d_model: int, *W_dec):
        n_layers, n_tokens, _ = acts.shape
        out = acts.new_zeros(n_tokens, n_layers * d_model, dtype=W_dec[0].dtype)
        active = _Pairs.where(acts != 0)
        value = acts[active.layer, active.token, active.feature].to(out.dtype)
        with torch.autocast(acts.device.type, enabled=False):
            for l, (W, feature, v) in enumerate(
                zip(W_dec, active.per_layer(active.feature), active.per_layer(value))
            ):
                y = F.embedding_bag(feature, W, active.offsets[l], mode="sum", per_sample_weights=v)
                out[:, l * d_model : l * d_model + W.shape[1]] += y  # W: (d_tc, n_out * d_model)
        ctx.save_for_backward(*W_dec)
        ctx.active, ctx.value = active, value
        ctx.grad_pairs = active if grad_mask is None else _Pairs.where(grad_mask)
        ctx.d_model, ctx.acts_shape, ctx.acts_dtype = d_model, acts.shape, acts.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        W_dec = ctx.saved_tensors
        d = ctx.d_model
        n_layers, _, d_tc = ctx.acts_shape
        want_acts = ctx.needs_input_grad[0]
        want_W = [ctx.needs_input_grad[3 + l] for l in range(n_layers)]
        q, p = ctx.grad_pairs, ctx.active
        q_features = q.per_layer(q.feature)
        q_tokens = q.per_layer(q.token)
        # the active pairs grouped by (layer, feature), for W_dec's gradient
        by_feature = torch.argsort(p.layer * d_tc + p.feature, stable=True)
        feature_offsets = _group_starts((p.layer * d_tc + p.feature)[by_feature], n_layers, d_tc)
        tokens_by_feature = p.per_layer(p.token[by_feature])
        values_by_feature = p.per_layer(ctx.value[by_feature])
        grad_values, grad_W = [], []
        with torch.autocast(grad.device.type, enabled=False):
            for l, W in enumerate(W_dec):
                g = grad[:, l * d : l * d + W.shape[1]].to(W.dtype).contiguous()  # (n_tokens, n_out * d)
                if want_acts:
                    grad_values.append(
                        torch.ops.aten._embedding_bag_per_sample_weights_backward(
                            g,
                            W,
                            q_features[l],
                            q.offsets[l],
                            q_tokens[l],
                            0,  # mode 0: sum
                        )
                    )
                grad_W.append(
                    F.embedding_bag(
                        tokens_by_feature[l],
                        g,
                        feature_offsets[l],
                        mode="sum",
                        per_sample_weights=values_by_feature[l],
                    )
                    if want_W[l]
                    else None
                )
        grad_acts = None
        if want_acts:
            grad_acts = grad.new_zeros(ctx.acts_shape, dtype=ctx.acts_dtype)
            grad_acts[q.layer, q.token, q.feature] = torch.cat(grad_values).to(ctx.acts_dtype)
        return grad_acts, None, None, *grad_W


class CrossLayerTranscoder(nn.Module):
    def __init__(self, shape: CLTShape):
        super().__init__()
        self.shape = shape
        L, d, F = shape.n_layers, shape.d_model, shape.d_transcoder
        self.W_enc = nn.Parameter(torch.empty(L, d, F))
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        self.log_threshold = nn.Parameter(torch.zeros(L, F))  # fp32 always
        self.W_dec = nn.ParameterList([nn.Parameter(torch.empty(F, shape.n_out(l), d)) for l in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.register_buffer("input_scale", torch.ones(L))
        self.register_buffer("output_scale", torch.ones(L))
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

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations h: x (n_tokens, n_layers, d_model) -> (n_layers, n_tokens, d_tc)."""
        return torch.einsum("tld,ldf->ltf", x, self.W_enc.to(x.dtype)) + self.b_enc.to(x.dtype)[:, None]

    def activate(self, h: torch.Tensor, bandwidth: float = 0.0) -> torch.Tensor:
        """Feature activations from pre-activations, per `shape.activation`."""
        kind = self.shape.activation
        if kind == "jumprelu":
            threshold = self.threshold[:, None]  # (n_layers, 1, d_tc)
            if bandwidth > 0 and torch.is_grad_enabled():
                return jumprelu(h.float(), threshold, bandwidth).to(h.dtype)
            return h * (h > threshold.to(h.dtype))
        mask = _topk_mask(h, self.shape.k) if kind == "topk" else _batch_topk_mask(h, self.shape.k)
        return torch.relu(h) * mask

    def decode(
        self, acts: torch.Tensor, *, sparse: bool = False, grad_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every layer's MLP output: acts (n_layers, n_tokens, d_tc) -> (n_tokens, n_layers, d_model).

        `sparse` touches only the nonzero (token, feature) pairs (`_SparseDecode`); it pays
        when L0 is a small fraction of d_transcoder (`python -m bench.train`). Its gradient
        with respect to `acts` is computed only where `grad_mask` (default: `acts != 0`) is
        true, and is 0 elsewhere.
        """
        L, n_tokens, _ = acts.shape
        d = self.shape.d_model
        if sparse:
            W_dec = [W.flatten(1) for W in self.W_dec]  # (d_tc, n_out * d_model) each, no copy
            out = _SparseDecode.apply(acts, grad_mask, d, *W_dec).view(n_tokens, L, d).to(acts.dtype)
        else:
            W_dec = [W.to(acts.dtype).flatten(1) for W in self.W_dec]
            out = _Decode.apply(acts, d, *W_dec).view(n_tokens, L, d)
        return out + self.b_dec.to(acts.dtype)

    def forward(self, x: torch.Tensor, *, bandwidth: float = 0.0, sparse: bool = False):
        """x (n_tokens, n_layers, d_model) -> pre-activations and activations (n_layers, n_tokens,
        d_tc), reconstruction (n_tokens, n_layers, d_model)."""
        h = self.pre_acts(x)
        acts = self.activate(h, bandwidth)
        grad_mask = None
        if sparse and self.shape.activation == "jumprelu" and bandwidth > 0 and torch.is_grad_enabled():
            # the threshold's STE needs dL/da at inactive features near their threshold too
            grad_mask = (acts != 0) | ste_window(h.float(), self.threshold[:, None], bandwidth)
        return h, acts, self.decode(acts, sparse=sparse, grad_mask=grad_mask)

    def config_dict(self) -> dict:
        return asdict(self.shape)

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
    """Write circuit-tracer's on-disk format (FORMATS.md §1), atomically.

    `clt`: `W_enc_{i}.safetensors` (W_enc_i [d_tc, d_model], b_enc_i, b_dec_i, threshold_i)
    and `W_dec_{i}.safetensors` (W_dec_i [d_tc, n_layers - i, d_model]).
    `plt`: `layer_{i}.safetensors` (W_enc, W_dec [d_tc, d_model], b_enc, b_dec,
    activation_function.threshold). Plus `config.yaml`.

    Its `scan` (where the frontend asks for feature examples) is a portable name, never a
    path (FORMATS.md §3): by default `./feature-data/<name>` with <name> the model's name
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
    out = Path(out)
    tmp = out.with_name(out.name + ".export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    w = raw_space_weights(model)
    for i in range(model.shape.n_layers):
        if model.shape.kind == "clt":
            save_file(
                {
                    f"W_enc_{i}": w["W_enc"][i],
                    f"b_enc_{i}": w["b_enc"][i],
                    f"b_dec_{i}": w["b_dec"][i],
                    f"threshold_{i}": w["threshold"][i],
                },
                tmp / f"W_enc_{i}.safetensors",
            )
            save_file({f"W_dec_{i}": w["W_dec"][i]}, tmp / f"W_dec_{i}.safetensors")
        else:
            save_file(
                {
                    "W_enc": w["W_enc"][i],
                    "W_dec": w["W_dec"][i][:, 0].contiguous(),
                    "b_enc": w["b_enc"][i],
                    "b_dec": w["b_dec"][i],
                    "activation_function.threshold": w["threshold"][i],
                },
                tmp / f"layer_{i}.safetensors",
            )
    config = {
        "model_kind": "cross_layer_transcoder" if model.shape.kind == "clt" else "transcoder_set",
        **HOOKS,
        "model_name": model_name,
        "scan": scan,  # always set: circuit-tracer would fall back to the folder's own path
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


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
    d_tc, d_model = W_enc[0].shape
    model = CrossLayerTranscoder(CLTShape(n_layers=n_layers, d_model=d_model, d_transcoder=d_tc, kind=kind))
    with torch.no_grad():
        model.W_enc.copy_(torch.stack([w.t() for w in W_enc]))
        model.b_enc.copy_(torch.stack(b_enc))
        model.b_dec.copy_(torch.stack(b_dec))
        model.log_threshold.copy_(torch.stack(threshold).log())
        for W, d in zip(model.W_dec, dec):
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
