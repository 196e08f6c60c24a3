"""Feature interventions on the real model, and graphs checked by them.

An intervention sets a transcoder feature's activation (clamps it to a value; 0 ablates
it) or scales it, at one position or at every position after BOS, and lets the change
propagate through the real model: attention and norms are live, and the response of the
MLPs downstream goes through the transcoder's features, recomputed from the new MLP
inputs, as in circuit-tracer's `feature_intervention`. `intervene` runs a batch of
intervention sets at once (each row of the batch one set), so checking a graph's features
one ablation at a time costs one or a few forward passes:

1. `parse_intervention`, `check_interventions`: a spec `L:F[@POS]=VALUE` (`=xK` scales by
   K); POS counts from the end when negative, and its absence means every position >= 1.
   BOS (position 0) has no features: circuit-tracer zeroes them, as our graphs do.
2. `intervene`: one forward pass on the prompt repeated `1 + len(batch)` times; row 0 is
   the clean model, row b the b-th intervention set. With l0 the first layer any set
   intervenes at, layers l >= l0 are spliced: a layer-l feature of a CLT writes to every
   layer >= l, so every one of those outputs must be the transcoder's; a per-layer
   transcoder (PLT) is spliced from l0 on too, so that its response downstream also goes
   through features, which is what a graph describes. Layers < l0 run unchanged. At a
   spliced layer l (`_Hooks`):
   a. on its MLP input x_l (`hook_resid_mid`), every row's features a_l = encode(x_l)
      are recomputed; the set's interventions at layer l then overwrite (or scale) theirs.
      Where a row's input cannot differ from row 0's (up to its first intervened layer,
      and before its first intervened position: attention is causal) it takes row 0's
      features exactly, so float rounding of the batch leaves no spurious changes;
   b. on its MLP output, row 0 keeps the real MLP output y_l and gives the error
      e_l = y_l - decode_l(a_0) of the clean features, held fixed; row b's output is
      decode_l(a_b) + e_l, the reconstruction from its current features of every layer
      <= l plus that error, computed as y_l + decode_l(a_b - a_0) - b_dec (the decoder
      is affine; the change is sparse). Only row 0 needs y_l, so the MLP runs on it alone.
   With no intervention, every row's features are the clean ones, so every row reproduces
   the model (to float rounding): the error terms make the splice exact. Features of layers
   < l0 are encoded too (a CLT's reconstruction of layer l reads every layer <= l); they
   are the clean ones. circuit-tracer instead keeps the real MLPs and adds the decoded
   change of the intervened features to their outputs; ours keeps the mechanism the graph
   is built from (features plus fixed errors), and the two agree on no intervention.
   Only the last position's logits and unembedding input come back (`logits_to_keep=1`).
3. `continue_intervened`: greedy decoding with the interventions, a clean row re-run
   beside it at every step so the errors of new tokens are theirs; interventions at every
   position reach the new tokens too.

Graphs checked by intervention (`check_graph`; the `graphs` stage stores its scores):

4. `predicted_ablation_effects`: the graph's prediction of how ablating each feature s
   moves the target. Edges include their source's activation (A[t, s] = a_s w_ts, w_ts
   the effect per unit of a_s), so in the graph's linear model (attention patterns and
   norm scales frozen, every selected feature's activation moving one for one with its
   pre-activation, errors, tokens and unselected features fixed) the changes u of the
   features' activations solve u = A_ff D^-1 u + (the ablation's -a_s at s), with
   D = diag(a) over the selected features; the logits move by A_tf D^-1 u, which is
   -[A_tf (I - D^-1 A_ff)^-1]_s: the total effect of s's whole activation, directly and
   along every path through other features. The series (I - M)^-1 = I + M + M^2 + ...
   ends after n_layers terms: edges only go up in layer. The target is the graph's own:
   the probability-weighted mean over its logit nodes k (weights p_k / sum p) of the logit
   minus the mean logit (each node's demeaned unembedding direction,
   `attribute.select_logit_targets`), read at the unembedding input, before any softcap.
5. `measured_ablation_effects`: the same features ablated (clamped to 0 at their own
   position) in the real model by `intervene`, the same target read off.
6. `check_graph`: for the graph's `n_features` most influential features (its influence
   on the logits, `prune.node_influence`, on the unpruned graph), the Pearson correlation
   of measured and predicted changes and the fraction with the same sign. The gap is what
   the graph leaves out: attention and norms responding, features crossing their
   threshold, features the graph did not select.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from pipeline.attribution.attribute import Graph, select_logit_targets, tokenize_prompt
from pipeline.attribution.prune import node_influence, total_influence
from pipeline.clt import CrossLayerTranscoder
from pipeline.model import get_layers
from pipeline.splice import greedy_continuation, splice_hooks


class SpecError(ValueError):
    """An intervention spec that cannot be applied; the message names it and the fix."""


@dataclass(frozen=True)
class Intervention:
    """Set feature `feature` of layer `layer` to `value` (times its activation when
    `scale`) at `position`, or at every position >= 1 when it is None."""

    layer: int
    feature: int
    position: int | None = None
    value: float = 0.0
    scale: bool = False
    spec: str = field(default="", compare=False)
    """The text it was parsed from, for messages."""

    def __str__(self) -> str:
        where = "" if self.position is None else f"@{self.position}"
        return f"{self.layer}:{self.feature}{where}={'x' if self.scale else ''}{self.value:g}"

    def describe(self) -> str:
        what = f"scaled by {self.value:g}" if self.scale else f"set to {self.value:g}"
        where = "every position" if self.position is None else f"position {self.position}"
        return f"layer {self.layer} feature {self.feature} {what} at {where}"


SPEC_HELP = (
    "LAYER:FEATURE[@POS]=VALUE, e.g. 12:345@-1=0 (=0 ablates, =xK scales by K; no @POS: every position)"
)
_SPEC = re.compile(r"(\d+):(\d+)(?:@([+-]?\d+))?=(x?)(.+)")


def parse_intervention(spec: str) -> Intervention:
    """Step 1: an `Intervention` from `L:F[@POS]=VALUE` or `L:F[@POS]=xK`."""
    match = _SPEC.fullmatch(spec.replace(" ", ""))
    value = None
    if match:
        with contextlib.suppress(ValueError):
            value = float(match.group(5))
    if value is None or not math.isfinite(value):
        raise SpecError(f"intervention {spec!r} is not of the form {SPEC_HELP}")
    layer, feature, position, scale = match.group(1), match.group(2), match.group(3), match.group(4)
    position = None if position is None else int(position)
    return Intervention(int(layer), int(feature), position, value, bool(scale), spec=spec)


def check_interventions(
    interventions: Sequence[Intervention], transcoder: CrossLayerTranscoder, n_pos: int
) -> list[Intervention]:
    """Step 1: `interventions` with negative positions counted from the end of a prompt of
    `n_pos` tokens (BOS included); a `SpecError` naming the first that does not fit."""
    n_layers, d_tc = transcoder.shape.n_layers, transcoder.shape.d_transcoder
    valid = f"1..{n_pos - 1} or -1..-{n_pos - 1}" if n_pos > 1 else "none: the prompt is empty"
    checked = []
    for iv in interventions:
        name = f"intervention {iv.spec or str(iv)!r}"
        if not 0 <= iv.layer < n_layers:
            raise SpecError(f"{name}: layer {iv.layer} is out of range; use a layer in 0..{n_layers - 1}")
        if not 0 <= iv.feature < d_tc:
            raise SpecError(
                f"{name}: feature {iv.feature} is out of range; layers have features 0..{d_tc - 1}"
            )
        position = iv.position
        if position is not None:
            position = position + n_pos if position < 0 else position
            if not 0 <= position < n_pos:
                raise SpecError(
                    f"{name}: position {iv.position} is beyond the prompt, which has {n_pos} tokens with "
                    f"BOS at 0; use a position in {valid}, or no @POS for every position"
                )
            if position == 0:
                raise SpecError(
                    f"{name}: position {iv.position} is BOS, which has no features (circuit-tracer zeroes "
                    f"them); use a position in {valid}"
                )
        checked.append(replace(iv, position=position))
    return checked


@dataclass
class InterventionResult:
    """The last position of a clean row and of each intervention set's row, float32."""

    clean_logits: torch.Tensor
    """(d_vocab,) the model's own next-token logits."""
    logits: torch.Tensor
    """(batch, d_vocab)."""
    clean_final: torch.Tensor
    """(d_model,) the unembedding's input (after the final norm) in the clean row."""
    final: torch.Tensor
    """(batch, d_model)."""


class _Hooks:
    """Step 2's hooks for one forward pass: row 0 clean, row b >= 1 intervened by
    `batch[b - 1]` (`_hooked` registers them on the spliced layers)."""

    def __init__(self, transcoder: CrossLayerTranscoder, batch: Sequence[Sequence[Intervention]], n_pos: int):
        self.transcoder = transcoder
        self.by_layer: dict[int, list[tuple[int, Intervention]]] = defaultdict(list)
        for row, interventions in enumerate(batch, start=1):
            for iv in interventions:
                self.by_layer[iv.layer].append((row, iv))
        # where each row can first differ from row 0: its first intervened layer's output,
        # at its first intervened position (causal attention; row 0 never)
        n_layers = transcoder.shape.n_layers
        layers = [min((iv.layer for iv in ivs), default=n_layers) for ivs in batch]
        starts = [
            min((1 if iv.position is None else iv.position for iv in ivs), default=n_pos) for ivs in batch
        ]
        self.first_layer = torch.tensor([n_layers, *layers])
        self.first_pos = torch.tensor([n_pos, *starts])
        self.deltas: dict[int, torch.Tensor] = {}  # layer -> (rows * n_pos, d_tc) sparse: a' - a
        self.final: torch.Tensor | None = None

    def encode(self, module, args, kwargs, *, layer):
        """2a: recompute the features of `layer`, then apply its interventions."""
        x = args[0] if args else kwargs["hidden_states"]  # (rows, n_pos, d_model)
        a = self.transcoder.encode_layer(x.float(), layer)  # (rows, n_pos, d_tc)
        # where a row's input cannot have changed, its features are row 0's: exactly, not up
        # to the rounding of a batched matmul, so the deltas stay sparse
        pos = torch.arange(a.shape[1], device=a.device)
        same = (self.first_layer >= layer)[:, None] | (pos[None] < self.first_pos[:, None])
        a = torch.where(same.to(a.device)[..., None], a[:1], a)
        for row, iv in self.by_layer.get(layer, ()):
            where = slice(1, None) if iv.position is None else iv.position
            a[row, where, iv.feature] = a[row, where, iv.feature] * iv.value if iv.scale else iv.value
        self.deltas[layer] = (a - a[:1]).flatten(0, 1).to_sparse()

    def narrow(self, module, args, output):
        """Only row 0 needs the real MLP output of a spliced layer: the MLP runs on it alone."""
        return output[:1]

    def reconstruct(self, module, args, output, *, layer):
        """2b: row 0 keeps the MLP output y; row b gets decode(a_b) + (y - decode(a_0)),
        i.e. y + decode(a_b - a_0) - b_dec (the decoder is affine)."""
        hidden = output[0] if isinstance(output, tuple) else output  # (1, n_pos, d_model)
        rows = self.first_layer.shape[0]
        change = self.transcoder.decode_layer(self.deltas, layer) - self.transcoder.b_dec[layer]
        spliced = (hidden.float() + change.view(rows, *hidden.shape[1:])).to(hidden.dtype)
        spliced[0] = hidden[0]
        return (spliced, *output[1:]) if isinstance(output, tuple) else spliced

    def on_unembed(self, module, args):
        self.final = args[0][:, -1].float()


@contextlib.contextmanager
def _hooked(model: nn.Module, hooks: _Hooks, first: int) -> Iterator[None]:
    """Register `hooks` for splicing layers >= `first` (`splice_hooks`) and for reading the
    unembedding's input."""
    spliced = range(first, len(get_layers(model)))
    handle = model.get_output_embeddings().register_forward_pre_hook(hooks.on_unembed)
    try:
        with splice_hooks(
            model,
            hooks.transcoder,
            spliced,
            encode=hooks.encode,
            narrow=hooks.narrow,
            reconstruct=hooks.reconstruct,
        ):
            yield
    finally:
        handle.remove()


@torch.inference_mode()
def intervene(
    model: nn.Module,
    transcoder: CrossLayerTranscoder,
    input_ids: torch.Tensor,
    batch: Sequence[Sequence[Intervention]],
    *,
    batch_size: int = 32,
) -> InterventionResult:
    """Step 2: the next-token logits of the model on `input_ids` (n_pos,) under each
    intervention set of `batch` (checked ones: `check_interventions`), `batch_size` sets
    per forward pass."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    logits, finals, clean = [], [], None
    for start in range(0, max(len(batch), 1), batch_size):
        chunk = batch[start : start + batch_size]
        first = min((iv.layer for ivs in chunk for iv in ivs), default=len(get_layers(model)))
        hooks = _Hooks(transcoder, chunk, len(input_ids))
        with _hooked(model, hooks, first):
            ids = input_ids[None].expand(1 + len(chunk), -1)
            out = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        if clean is None:
            clean = (out[0], hooks.final[0])
        logits.append(out[1:])
        finals.append(hooks.final[1:])
    return InterventionResult(clean[0], torch.cat(logits), clean[1], torch.cat(finals))


def continue_intervened(
    model: nn.Module,
    transcoder: CrossLayerTranscoder,
    input_ids: torch.Tensor,
    interventions: Sequence[Intervention],
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
) -> list[int]:
    """Step 3: greedy continuation of `input_ids` under `interventions` (checked); the new ids."""
    ids = input_ids.tolist()
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(intervene(model, transcoder, torch.tensor(ids), [interventions]).logits[0].argmax())
        ids.append(token)
        new.append(token)
        if token == eos_token_id:
            break
    return new


def compare(
    model: nn.Module,
    tokenizer,
    transcoder: CrossLayerTranscoder,
    prompt: str,
    specs: Sequence[str],
    *,
    top_k: int = 5,
    max_new_tokens: int = 10,
) -> dict:
    """What `clt intervene` prints: the prompt's tokens, the checked interventions, the
    `top_k` next tokens with their probabilities and the greedy continuations, before
    (the model) and after (the interventions)."""
    from pipeline.featpack import token_strings

    input_ids = tokenize_prompt(tokenizer, prompt)
    interventions = check_interventions([parse_intervention(s) for s in specs], transcoder, len(input_ids))
    result = intervene(model, transcoder, input_ids, [interventions])
    kwargs = {"max_new_tokens": max_new_tokens, "eos_token_id": tokenizer.eos_token_id}
    before_ids = greedy_continuation(model, input_ids.tolist(), **kwargs)
    after_ids = continue_intervened(model, transcoder, input_ids, interventions, **kwargs)
    tops = {}
    for name, logits in (("before", result.clean_logits), ("after", result.logits[0])):
        probs, ids = torch.softmax(logits, -1).topk(top_k)
        tops[name] = list(zip(ids.tolist(), probs.tolist()))
    strings = token_strings(tokenizer, [*input_ids.tolist(), *(t for top in tops.values() for t, _ in top)])
    return {
        "prompt_tokens": [strings[t] for t in input_ids.tolist()],
        "interventions": interventions,
        **{f"top_{name}": [(strings[t], p) for t, p in top] for name, top in tops.items()},
        "continuation_before": tokenizer.decode(before_ids, skip_special_tokens=True),
        "continuation_after": tokenizer.decode(after_ids, skip_special_tokens=True),
    }


# --- graphs checked by intervention ------------------------------------------------------


def target_weights(graph: Graph) -> torch.Tensor:
    """(n_logits,) the weight of each logit node in the target: p_k / sum p."""
    return graph.logit_probs / graph.logit_probs.sum()


def predicted_ablation_effects(graph: Graph) -> torch.Tensor:
    """Step 4: (n_selected,) the change of the target the graph predicts when each selected
    feature is ablated: -[w A_tf (I - D^-1 A_ff)^-1]_s, in float64."""
    n_features, n_logits = len(graph.selected), len(graph.logit_ids)
    A = graph.adjacency.double()
    acts = graph.activations[graph.selected].double()
    direct = target_weights(graph).double() @ A[-n_logits:, :n_features]  # w A_tf
    M = A[:n_features, :n_features] / acts[:, None]  # D^-1 A_ff
    return -(direct + total_influence(M, direct))


def measured_ablation_effects(
    model: nn.Module,
    transcoder: CrossLayerTranscoder,
    graph: Graph,
    nodes: torch.Tensor,
    *,
    batch_size: int = 32,
) -> torch.Tensor:
    """Step 5: (len(nodes),) the change of the target when each of the selected features
    `nodes` (indices into `graph.selected`) is ablated at its position in the real model."""
    features = graph.active_features[graph.selected[nodes]].tolist()
    batch = [[Intervention(l, f, p, 0.0)] for l, p, f in features]
    result = intervene(model, transcoder, graph.input_ids, batch, batch_size=batch_size)
    _, _, vectors = select_logit_targets(
        result.clean_logits,
        model.get_output_embeddings().weight,
        max_n_logits=len(graph.logit_ids),
        desired_logit_prob=1.0,
        token_ids=graph.logit_ids.tolist(),
    )
    weights = target_weights(graph).to(vectors.device)
    target = (torch.cat([result.clean_final[None], result.final]) @ vectors.t()) @ weights  # (1 + n,)
    return (target[1:] - target[0]).double().cpu()


def agreement(measured: torch.Tensor, predicted: torch.Tensor) -> dict[str, float]:
    """Pearson correlation (0 when either side is constant or there are < 2 values) and
    the fraction of same signs."""
    same_sign = (
        float((torch.sign(measured) == torch.sign(predicted)).double().mean()) if len(measured) else 0.0
    )
    pearson = 0.0
    if len(measured) >= 2 and measured.std() > 0 and predicted.std() > 0:
        pearson = float(torch.corrcoef(torch.stack([measured, predicted]))[0, 1])
    return {"intervention_pearson": pearson, "intervention_sign_agreement": same_sign}


def check_graph(
    model: nn.Module,
    transcoder: CrossLayerTranscoder,
    graph: Graph,
    *,
    n_features: int = 20,
    batch_size: int = 32,
) -> dict[str, float]:
    """Step 6: `intervention_pearson` and `intervention_sign_agreement` of the graph's
    `n_features` most influential features."""
    n_selected = len(graph.selected)
    influence = node_influence(graph)[:n_selected]
    nodes = influence.topk(min(n_features, n_selected)).indices
    measured = measured_ablation_effects(model, transcoder, graph, nodes, batch_size=batch_size)
    return agreement(measured, predicted_ablation_effects(graph)[nodes])
