"""The local replacement model: the real model made linear by freezing, on one prompt.

Circuit tracing (Ameisen et al. 2025,
https://transformer-circuits.pub/2025/attribution-graphs/methods.html#graphs-linear) studies
the model with its attention patterns and normalisation denominators frozen at their
values on the prompt and each MLP replaced by the transcoder's reconstruction plus a
constant error term. Everything left is linear in the token embeddings and the MLP
outputs, so direct effects are gradients. `linearize` builds that model on a plain
transformers model with hooks (no TransformerLens, no nnsight): `_hooked` registers the
forward hooks of `_Hooks` for one run, and `_frozen_attention` swaps the attention function:

- attention (`_frozen_attention`): the model's own attention function runs with `query`
  and `key` detached (so the pattern is exactly the model's, but carries no gradient); with
  `frozen` given, query and key are replaced by those recorded on the clean run, so the
  pattern stays frozen when an intervention changes the residual stream;
- norms (RMSNorm, Gemma's RMSNorm with `1 + weight`, LayerNorm; `_Hooks.on_norm`, which
  calls `_frozen_norm`): the denominator rsqrt(mean(x^2) + eps) (or the variance for
  LayerNorm) is computed from a detached input, or taken from the clean run under `frozen`;
  the mean subtraction of LayerNorm stays (it is linear);
- MLP outputs (`hook_mlp_out`; `_Hooks.on_mlp_out`) and the token embedding
  (`_Hooks.on_embed`) become leaf tensors holding the real values (or given replacement
  values): gradients stop at them, and they are the "write points" where the graph's
  source nodes (features, errors, tokens) add into the residual stream;
- recorded (`_Hooks.on_mlp_in`, `_Hooks.on_unembed`): each layer's MLP input
  (`hook_resid_mid`, where a feature's pre-activation is read) and the input of the
  unembedding (after the final norm, where logits are read); `_Hooks.result` gathers them
  into a `LinearizedRun`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pipeline.model import get_architecture, get_layers, get_trunk


@dataclass
class FrozenState:
    """What a clean run froze: each attention module's query/key and each norm's scale."""

    qk: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scales: dict[nn.Module, torch.Tensor] = field(default_factory=dict)


@dataclass
class LinearizedRun:
    """One forward pass of the local replacement model (batch of one prompt)."""

    logits: torch.Tensor
    """(n_pos, d_vocab) float32."""
    embed: torch.Tensor
    """Leaf (1, n_pos, d_model): the token embedding as it enters the residual stream."""
    mlp_out: list[torch.Tensor]
    """Leaves (1, n_pos, d_model) per layer: the MLP block outputs."""
    mlp_in: list[torch.Tensor]
    """(1, n_pos, d_model) per layer, in the autograd graph: the MLP inputs."""
    final: torch.Tensor
    """(1, n_pos, d_model), in the autograd graph: the unembedding's input."""
    frozen: FrozenState


def _norm_kind(module: nn.Module) -> str | None:
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm):
        return "layer"
    if name.endswith("RMSNorm"):
        return "gemma" if name.startswith("Gemma") else "rms"
    return None


def _frozen_norm(module: nn.Module, x: torch.Tensor, kind: str, scale: torch.Tensor | None):
    """The norm with its denominator `scale` held constant; returns (output, scale)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    if kind == "layer":
        centered = x - x.mean(-1, keepdim=True)
        if scale is None:
            scale = torch.rsqrt(x.detach().var(-1, unbiased=False, keepdim=True) + eps)
        y = centered * scale
        if module.weight is not None:
            y = y * module.weight
        if module.bias is not None:
            y = y + module.bias
        return y, scale
    xf = x.float()
    if scale is None:
        scale = torch.rsqrt(xf.detach().pow(2).mean(-1, keepdim=True) + eps)
    y = xf * scale
    if kind == "gemma":
        return (y * (1.0 + module.weight.float())).to(x.dtype), scale
    return module.weight * y.to(x.dtype), scale


@contextlib.contextmanager
def _frozen_attention(model: nn.Module, state: FrozenState, replay: bool) -> Iterator[None]:
    """Run the model's own eager attention function with query and key detached (or replayed).

    Eager attention computes the pattern explicitly and applies it with a matmul, which
    `is_grads_batched` backward passes batch; fused SDPA kernels have no batching rule
    (measured: a per-target loop, ~10x slower), so the model runs in eager mode here.
    """
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    saved = ALL_ATTENTION_FUNCTIONS._global_mapping.get("eager")

    def frozen(module, query, key, value, *args, **kwargs):
        if replay:
            query, key = state.qk[module]
        else:
            query, key = query.detach(), key.detach()
            state.qk[module] = (query, key)
        eager = saved or sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS._global_mapping["eager"] = frozen
    try:
        yield
    finally:
        if saved is None:
            del ALL_ATTENTION_FUNCTIONS._global_mapping["eager"]
        else:
            ALL_ATTENTION_FUNCTIONS._global_mapping["eager"] = saved
        if previous != "eager":
            model.set_attn_implementation(previous)


class _Hooks:
    """The forward hooks of one `linearize` run, and the leaves and MLP inputs they record.

    With `replay`, norms take their scales from `state`; otherwise they record them there.
    `embed` / `mlp_out`, when given, replace the values the leaves hold.
    """

    def __init__(
        self,
        state: FrozenState,
        *,
        replay: bool,
        embed: torch.Tensor | None,
        mlp_out: list[torch.Tensor] | None,
    ):
        self.state, self.replay = state, replay
        self.embed, self.mlp_out = embed, mlp_out
        self.leaves: dict[str, torch.Tensor] = {}
        self.mlp_in: dict[int, torch.Tensor] = {}

    @staticmethod
    def leaf(value: torch.Tensor, replacement: torch.Tensor | None) -> torch.Tensor:
        value = value if replacement is None else replacement.to(value.dtype)
        return value.detach().clone().requires_grad_(True)

    def on_embed(self, module, args, output):
        self.leaves["embed"] = self.leaf(output, self.embed)
        return self.leaves["embed"]

    def on_mlp_in(self, module, args, kwargs, *, layer):
        self.mlp_in[layer] = args[0] if args else kwargs["hidden_states"]

    def on_mlp_out(self, module, args, output, *, layer):
        hidden = output[0] if isinstance(output, tuple) else output
        new = self.leaf(hidden, None if self.mlp_out is None else self.mlp_out[layer])
        self.leaves[f"mlp_{layer}"] = new
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def on_norm(self, module, args, output, *, kind):
        scale = self.state.scales.get(module) if self.replay else None
        y, scale = _frozen_norm(module, args[0], kind, scale)
        self.state.scales[module] = scale
        return y

    def on_unembed(self, module, args):
        self.leaves["final"] = args[0]

    def result(self, logits: torch.Tensor, n_layers: int) -> LinearizedRun:
        """The `LinearizedRun` of the model's `logits` (1, n_pos, d_vocab) and what was recorded."""
        return LinearizedRun(
            logits=logits[0].detach().float(),
            embed=self.leaves["embed"],
            mlp_out=[self.leaves[f"mlp_{l}"] for l in range(n_layers)],
            mlp_in=[self.mlp_in[l] for l in range(n_layers)],
            final=self.leaves["final"],
            frozen=self.state,
        )


@contextlib.contextmanager
def _hooked(model: nn.Module, hooks: _Hooks) -> Iterator[None]:
    """Register `hooks` on every norm, the embedding, each MLP's input and output and the
    unembedding's input; remove them all on exit."""
    arch = get_architecture(model)
    trunk, blocks = get_trunk(model), get_layers(model)
    handles = []
    try:
        for module in model.modules():
            kind = _norm_kind(module)
            if kind is not None:
                handles.append(module.register_forward_hook(functools.partial(hooks.on_norm, kind=kind)))
        handles.append(getattr(trunk, arch.embed).register_forward_hook(hooks.on_embed))
        for l, block in enumerate(blocks):
            pre = functools.partial(hooks.on_mlp_in, layer=l)
            handles.append(
                block.get_submodule(arch.mlp_input).register_forward_pre_hook(pre, with_kwargs=True)
            )
            post = functools.partial(hooks.on_mlp_out, layer=l)
            handles.append(block.get_submodule(arch.mlp_output).register_forward_hook(post))
        handles.append(model.get_output_embeddings().register_forward_pre_hook(hooks.on_unembed))
        yield
    finally:
        for h in handles:
            h.remove()


def linearize(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    frozen: FrozenState | None = None,
    embed: torch.Tensor | None = None,
    mlp_out: list[torch.Tensor] | None = None,
) -> LinearizedRun:
    """Run the local replacement model on `input_ids` (n_pos,).

    Without `frozen`, patterns and norm scales come from this run (the clean run). With
    `frozen` (a clean run's `FrozenState`), they are replayed, and `embed` / `mlp_out`
    (each (1, n_pos, d_model)) may replace the embedding and MLP outputs: the result is
    then the frozen, linear model's response to that intervention.
    """
    replay = frozen is not None
    state = frozen or FrozenState()
    hooks = _Hooks(state, replay=replay, embed=embed, mlp_out=mlp_out)
    with _hooked(model, hooks), _frozen_attention(model, state, replay), torch.enable_grad():
        logits = model(input_ids=input_ids[None], use_cache=False).logits
    return hooks.result(logits, len(get_layers(model)))
