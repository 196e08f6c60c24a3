"""The transcoder spliced into the language model in place of its MLPs.

The replacement model of Ameisen et al., "Circuit Tracing" (2025),
https://transformer-circuits.pub/2025/attribution-graphs/methods.html#building-replacement-model:
forward hooks replace MLP block outputs (`hook_mlp_out`) by the transcoder's
reconstruction. A pre-hook on each layer's MLP input (`hook_resid_mid`) encodes that
layer's features from the *replacement model's own* residual stream and decodes them, in
one matmul (`CrossLayerTranscoder.decode_from`), into their terms of every spliced layer
they write to; the hook on the MLP output of layer l sums the terms of the layers <= l,
which have all run by then.
Splicing one layer only replaces that layer's output; its features still come from layers
<= l of a model that is unchanged up to l. `zero_ablate` sets MLP outputs to 0 instead.
Position 0 (BOS) always keeps the original MLP output: training excluded BOS rows, and
circuit-tracer likewise zeroes features at position 0.

The transcoder runs in float32 (inputs cast up, its reconstructions cast back to the
model's dtype).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from pipeline.clt import CrossLayerTranscoder, load_transcoder
from pipeline.config import Params
from pipeline.model import bos_token_id, get_architecture, get_layers, load_model
from pipeline.runtime import resolve_device, torch_dtype


def check_fits(transcoder: CrossLayerTranscoder, model: nn.Module, where: str) -> None:
    """A clear error unless `transcoder` (loaded from `where`) is a raw-space JumpReLU
    transcoder with the model's n_layers and d_model."""
    other = f"the model ({model.config.name_or_path})"
    transcoder.check_fits(len(get_layers(model)), model.config.hidden_size, where=where, other=other)
    transcoder.check_raw(where)


def _replace_after_bos(output, new: torch.Tensor):
    """The module output with positions >= 1 set to `new` (batch, seq, d_model); its hidden states
    may hold position 0 alone (`splice` runs the MLP on BOS only)."""
    hidden = output[0] if isinstance(output, tuple) else output
    spliced = torch.cat([hidden[:, :1], new[:, 1:].to(hidden.dtype)], dim=1)
    return (spliced, *output[1:]) if isinstance(output, tuple) else spliced


@contextlib.contextmanager
def splice(model: nn.Module, transcoder: CrossLayerTranscoder, layers: Sequence[int]) -> Iterator[None]:
    """Within the context, the MLP outputs of `layers` (positions >= 1) are the transcoder's
    reconstruction, from features computed on the running model's own MLP inputs."""
    targets: dict[int, list[int]] = {}  # source layer -> the spliced layers it writes to
    for t in layers:
        for l in transcoder.source_layers(t):
            targets.setdefault(l, []).append(t)
    terms: dict[tuple[int, int], torch.Tensor] = {}  # (source, target) -> (batch, seq, d_model)

    def encode(module, args, kwargs, *, layer):
        x = args[0] if args else kwargs["hidden_states"]
        acts = transcoder.encode_layer(x.float(), layer)
        parts = transcoder.decode_from(acts, layer, targets[layer])
        terms.update({(layer, t): part for t, part in zip(targets[layer], parts)})

    def narrow(module, args, output):
        """The MLP input module (its norm) feeds only the MLP, and only BOS keeps the MLP's
        output: the MLP runs on position 0 alone."""
        return output[:, :1]

    def reconstruct(module, args, output, *, layer):
        recon = transcoder.b_dec[layer] + sum(terms.pop((l, layer)) for l in transcoder.source_layers(layer))
        return _replace_after_bos(output, recon)

    with splice_hooks(model, transcoder, layers, encode=encode, narrow=narrow, reconstruct=reconstruct):
        yield


@contextlib.contextmanager
def splice_hooks(
    model: nn.Module,
    transcoder: CrossLayerTranscoder,
    layers: Sequence[int],
    *,
    encode: Callable,
    narrow: Callable,
    reconstruct: Callable,
) -> Iterator[None]:
    """The hooks of a replacement model, removed on exit: `encode(module, args, kwargs,
    layer=l)` a forward pre-hook on the MLP input module (the norm) of each layer l whose
    features `transcoder` decodes into a layer of `layers`; on each spliced layer l of
    `layers`, `narrow` a forward hook on that module's output (it feeds only the MLP, so it
    may drop what the MLP need not compute) and `reconstruct(module, args, output, layer=l)`
    one on the MLP output."""
    arch, blocks = get_architecture(model), get_layers(model)
    sources = sorted({l for target in layers for l in transcoder.source_layers(target)})
    handles = []
    try:
        for l in sources:
            mlp_input = blocks[l].get_submodule(arch.mlp_input)
            hook = functools.partial(encode, layer=l)
            handles.append(mlp_input.register_forward_pre_hook(hook, with_kwargs=True))
        for l in layers:
            handles.append(blocks[l].get_submodule(arch.mlp_input).register_forward_hook(narrow))
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


def load_for_splicing(params: Params, *, dtype: torch.dtype | None = None) -> tuple:
    """`(model, tokenizer, transcoder)` on `runtime.device`, checked to fit each other; the
    model in `dtype` (default: `model.dtype`)."""
    device = resolve_device(params.runtime.device)
    transcoder = load_transcoder(params.paths.transcoder)
    dtype = dtype or torch_dtype(params.model.dtype)
    model, tokenizer = load_model(params.paths.model_dir, dtype=dtype, device=device)
    check_fits(transcoder, model, params.paths.transcoder)
    return model, tokenizer, transcoder.to(device)


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
