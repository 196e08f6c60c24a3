"""The logit lens of every feature (step 6 of `pipeline.examples`): the output tokens its
decoder directions promote and suppress most, through the final norm and the unembedding.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.clt import CrossLayerTranscoder
from pipeline.model import get_architecture, get_trunk


@torch.inference_mode()
def logit_lens(
    transcoder: CrossLayerTranscoder, unembed: torch.Tensor, gain: torch.Tensor, k: int, chunk: int = 1024
) -> list[dict[str, np.ndarray]]:
    """Top and bottom `k` output tokens of each feature's direct effect on the logits.

    A feature of layer l writes W_dec_l[f, j] to the MLP output of every layer l + j; all of
    them add into the residual stream, which reaches the unembedding through the final norm.
    So the decoder is reduced to the sum over its output layers, sum_j W_dec_l[f, j]: the
    feature's total direct contribution to the final residual stream (for a per-layer
    transcoder, its one slice). That direction, times the final norm's elementwise gain
    (`gain`; the norm's division by the RMS is positive, so it does not change the ranking),
    goes through the unembedding `unembed` (vocab, d_model). Effects through later attention
    and MLPs are ignored, as in any logit lens.
    """
    out = []
    for W in transcoder.W_dec:  # (d_tc, n_out, d_model)
        direction = W.detach().float().sum(1) * gain  # (d_tc, d_model)
        parts: dict[str, list] = {"top_ids": [], "top_values": [], "bottom_ids": [], "bottom_values": []}
        for c in range(0, len(direction), chunk):
            logits = direction[c : c + chunk] @ unembed.t()  # (chunk, vocab)
            top = logits.topk(k, dim=1)
            bottom = logits.topk(k, dim=1, largest=False)
            parts["top_ids"].append(top.indices)
            parts["top_values"].append(top.values)
            parts["bottom_ids"].append(bottom.indices)
            parts["bottom_values"].append(bottom.values)
        out.append({name: torch.cat(v).cpu().numpy() for name, v in parts.items()})
    return out


def unembedding(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's unembedding (vocab, d_model) and its final norm's elementwise gain
    (d_model,), float32. Gemma's RMSNorm multiplies by (1 + weight)."""
    norm = getattr(get_trunk(model), get_architecture(model).final_norm)
    gain = norm.weight.detach().float()
    if type(norm).__name__.startswith("Gemma"):
        gain = 1 + gain
    return model.get_output_embeddings().weight.detach().float(), gain
