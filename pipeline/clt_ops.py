"""The transcoder's custom autograd operations: JumpReLU with its straight-through threshold
gradient, TopK masks, and the dense and token-level sparse decoders of all layers at once.

The JumpReLU threshold gets gradients through a straight-through estimator with a
rectangle kernel of width `bandwidth` (Rajamanoharan et al. 2024,
https://arxiv.org/abs/2407.14435): d a / d threshold = -(threshold / bandwidth) *
rect((h - threshold) / bandwidth). `pipeline.clt.CrossLayerTranscoder` uses these.

Feature parallel (`pipeline.clt.FeatureShard`): each rank decodes its own features into a
partial reconstruction of every layer, and `sum_partials` adds them up across ranks (one
all-reduce per step); `global_topk_mask` / `global_batch_topk_mask` select the top
features among all ranks' (one all-gather of each rank's local candidates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _JumpReLU(torch.autograd.Function):
    """a = h * (h > threshold), with the rectangle-kernel STE for the threshold.

    `h` may be bfloat16 and `threshold` float32: the comparisons promote element by element
    (no float32 copy of h), and only two boolean masks are kept for the backward pass; on
    (n_layers, n_tokens, d_tc) tensors each pass over memory is what this op costs."""

    @staticmethod
    def forward(ctx, h, threshold, bandwidth: float):
        mask = h > threshold
        window = ste_window(h, threshold, bandwidth)
        ctx.save_for_backward(threshold, mask, window)
        ctx.bandwidth = bandwidth
        return h * mask

    @staticmethod
    def backward(ctx, grad):
        threshold, mask, window = ctx.saved_tensors
        grad_h = grad * mask
        sums = torch.where(window, grad, 0)
        lead = grad.dim() - threshold.dim()
        dims = [i + lead for i, n in enumerate(threshold.shape) if n == 1 and grad.shape[i + lead] != 1]
        if dims:  # the sum over tokens in float32, without a float32 copy of grad
            sums = sums.sum(dims, keepdim=True, dtype=torch.float32)
        sums = sums.float().sum_to_size(threshold.shape)
        return grad_h, -(threshold / ctx.bandwidth) * sums, None


def jumprelu(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _JumpReLU.apply(h, threshold, bandwidth)


def jumprelu_ops(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """`jumprelu` in plain differentiable ops, which `torch.compile` fuses with the ops
    around it (eager, the autograd Function keeps less memory): the STE is a term whose
    value is 0 and whose gradient with respect to the threshold is the Function's."""
    fixed = threshold.detach()
    ste = (threshold - fixed) * (-(fixed / bandwidth)) * ste_window(h, fixed, bandwidth)
    return h * (h > fixed) + ste.to(h.dtype)


def ste_window(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Where the threshold's straight-through estimator is nonzero: |h - threshold| < bandwidth / 2.

    There the threshold's gradient needs dL/da even for inactive features (a = 0)."""
    return (h - threshold).abs() < bandwidth / 2


def needs_grad_mask(h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Where a JumpReLU needs dL/da: its active features (h > threshold) and its STE window,
    both inside h > threshold - bandwidth / 2 (one comparison instead of four passes over h;
    a slightly larger mask is harmless: the sparse decoder's gradient is exact wherever it is
    computed)."""
    return h > threshold - bandwidth / 2


def topk_mask(h: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the top `k` of the last dim (per layer and token)."""
    idx = h.topk(k, dim=-1).indices
    return torch.zeros_like(h, dtype=torch.bool).scatter_(-1, idx, True)


def batch_topk_mask(h: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the top `k * n_tokens` of each layer across the batch: h (n_layers, n_tokens, d_tc)."""
    n_layers, n_tokens, _ = h.shape
    flat = h.reshape(n_layers, -1)
    idx = flat.topk(k * n_tokens, dim=-1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True).view_as(h)


class _SumPartials(torch.autograd.Function):
    """The sum over ranks of each rank's partial reconstruction; its backward is the identity.

    Every rank computes the same loss from the summed reconstruction, so each rank's
    gradient of it is already d loss / d partial (the sum's Jacobian with respect to each
    part is the identity). `torch.distributed.nn.functional.all_reduce` would all-reduce the
    gradient again in its backward: N times the true gradient."""

    @staticmethod
    def forward(ctx, partial):
        total = partial.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad


def sum_partials(partial: torch.Tensor) -> torch.Tensor:
    """`partial` summed over every rank of the process group (identity backward)."""
    return _SumPartials.apply(partial)


def _gathered(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Every rank's `t` (same shape on all), concatenated along `dim` in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


def global_topk_mask(h: torch.Tensor, k: int) -> torch.Tensor:
    """`topk_mask` over the features of all ranks, each holding a slice of the last dim of
    h (n_layers, n_tokens, d_local): a feature is kept where its pre-activation reaches the
    k-th largest of the whole row. The global top k lies within the union of every rank's
    local top min(k, d_local), so only those are gathered. Equal values at the k-th place
    are all kept (one process's `topk_mask` keeps an arbitrary k): rare within a token, but
    for `global_batch_topk_mask` a batch with repeated tokens has them."""
    with torch.no_grad():
        local = h.topk(min(k, h.shape[-1]), dim=-1).values
        kth = _gathered(local, -1).topk(k, dim=-1).values[..., -1:]
    return h >= kth


def global_batch_topk_mask(h: torch.Tensor, k: int) -> torch.Tensor:
    """`batch_topk_mask` over the features of all ranks (see `global_topk_mask`): the top
    `k * n_tokens` of each layer across the batch and every rank's features."""
    n_layers, n_tokens, _ = h.shape
    with torch.no_grad():
        flat = h.reshape(n_layers, -1)
        local = flat.topk(min(k * n_tokens, flat.shape[-1]), dim=-1).values
        kth = _gathered(local, -1).topk(k * n_tokens, dim=-1).values[:, -1]
    return h >= kth[:, None, None]


class _DecoderWeights(torch.autograd.Function):
    """Each layer's decoder flattened to (d_tc, n_out * d_model) in the compute dtype, and
    every feature's decoder norm ||W_dec_f|| (n_layers, d_tc) in float32, as one op.

    A training step uses both: the copies to decode, the norms in the JumpReLU loss's
    terms. As separate ops (a cast, a norm) the backward makes three passes over every
    decoder parameter (upcast the copy's gradient, the norm's W / ||W|| times its gradient,
    their sum) and allocates two float32 tensors of the decoder's size; here it is one
    `addcmul` per layer: dL/dW = dL/dcopy + (dL/dnorm / ||W||) W."""

    @staticmethod
    def forward(ctx, dtype, *W_dec):
        flat = [W.flatten(1) for W in W_dec]
        norms = torch.stack([W.norm(dim=1) for W in flat])
        ctx.save_for_backward(norms, *W_dec)
        # a copy even in the parameters' own dtype: an op's output must not alias its input
        return (norms, *(W.to(dtype, copy=True) for W in flat))

    @staticmethod
    def backward(ctx, grad_norms, *grad_copies):
        norms, *W_dec = ctx.saved_tensors
        # d||w|| / dw = w / ||w||, and 0 at w = 0 (as torch's norm): a clamped norm gives that
        scale = None if grad_norms is None else (grad_norms / norms.clamp_min(torch.finfo(norms.dtype).tiny))
        grads = []
        for l, (W, g) in enumerate(zip(W_dec, grad_copies)):
            s = None if scale is None else scale[l][:, None, None]
            if g is None:
                grads.append(None if s is None else W * s)
                continue
            g = g.reshape(W.shape)
            grads.append(g.to(W.dtype) if s is None else torch.addcmul(g, W, s))
        return None, *grads


def decoder_weights(
    W_dec: Sequence[torch.Tensor], dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(decoder norms (n_layers, d_tc) float32, each W_dec[l] as (d_tc, n_out * d_model) in
    `dtype`): `_DecoderWeights`, one autograd op."""
    norms, *flat = _DecoderWeights.apply(dtype, *W_dec)
    return norms, flat


class Decode(torch.autograd.Function):
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

    def subset(self, keep: torch.Tensor, n_tokens: int) -> _Pairs:
        """The pairs where `keep` (nnz,) is true, still sorted: a second mask's pairs
        without a second pass over the whole (n_layers, n_tokens, d_tc) mask."""
        layer, token, feature = self.layer[keep], self.token[keep], self.feature[keep]
        n_layers = len(self.sizes)
        sizes = torch.bincount(layer, minlength=n_layers).tolist()
        offsets = _group_starts(layer * n_tokens + token, n_layers, n_tokens)
        return _Pairs(layer, token, feature, sizes, offsets)

    def per_layer(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A (nnz,) tensor split into its layers' parts."""
        return t.split(self.sizes)


class SparseDecode(torch.autograd.Function):
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
      `grad_mask` (n_layers, n_tokens, d_tc), by default the active ones, and 0 elsewhere;
      a `grad_mask` must hold every active pair (the active ones are found among its own).
      Every activation here passes back zero gradient to h where a = 0, but the JumpReLU
      threshold's straight-through estimator also needs dL/da at inactive features just
      below the threshold (`ste_window`), so `pipeline.clt.CrossLayerTranscoder.forward` adds those.
    It gathers and accumulates in W_dec's dtype (`CrossLayerTranscoder.decode` passes the
    copy in the compute dtype, bfloat16 by default: half the bytes per gathered row, which
    is what these memory-bound gathers cost), autocast off inside.
    """

    @staticmethod
    def forward(ctx, acts, grad_mask, d_model: int, *W_dec):
        n_layers, n_tokens, _ = acts.shape
        out = acts.new_zeros(n_tokens, n_layers * d_model, dtype=W_dec[0].dtype)
        if grad_mask is None:
            active = grad_pairs = _Pairs.where(acts != 0)
            value = acts[active.layer, active.token, active.feature]
        else:  # one pass over the masks: the active pairs are a subset of grad_mask's
            grad_pairs = _Pairs.where(grad_mask)
            value = acts[grad_pairs.layer, grad_pairs.token, grad_pairs.feature]
            nonzero = value != 0
            active, value = grad_pairs.subset(nonzero, n_tokens), value[nonzero]
        value = value.to(out.dtype)
        with torch.autocast(acts.device.type, enabled=False):
            for l, (W, feature, v) in enumerate(
                zip(W_dec, active.per_layer(active.feature), active.per_layer(value))
            ):
                y = F.embedding_bag(feature, W, active.offsets[l], mode="sum", per_sample_weights=v)
                out[:, l * d_model : l * d_model + W.shape[1]] += y  # W: (d_tc, n_out * d_model)
        ctx.save_for_backward(*W_dec)
        ctx.active, ctx.value = active, value
        ctx.grad_pairs = grad_pairs
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
