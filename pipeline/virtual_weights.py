"""Virtual weights: the input-invariant connections between transcoder features, through
the residual stream (Ameisen et al., "Circuit Tracing" (2025), "Global weights",
https://transformer-circuits.pub/2025/attribution-graphs/methods.html).

A source feature s of layer l writes its decoder vectors to the MLP outputs of layers
k >= l; each is added to the residual stream, which the encoder of a later layer m reads.
The direct path, ignoring attention, is the virtual weight

    V[s, t] = W_enc_m[:, t] . sum_{l <= k < m} W_dec_l[s, k - l]        (m > l)

(a per-layer transcoder only has k = l). It is the change in target t's pre-activation per
unit of s's activation, along that path. There is no m == l term: layer l's encoder reads
its MLP input before layer l's decoders write its MLP output.

No norm is linearised: the encoder reads `hook_resid_mid`, the residual stream *before* the
pre-MLP norm (the pre-hook on `Architecture.mlp_input`, `pipeline/model.py`; the norm is
part of the MLP the transcoder replaces), and every architecture adds `hook_mlp_out` to the
residual stream unchanged (Gemma's `post_feedforward_layernorm` is inside the block). So
the path is exactly linear and the weights need the transcoder alone, not the model.

Steps:

1. `decoder_slice`: W_dec_l[:, k - l], what layer l's features write to MLP output k
   (None where l does not write to k, `CrossLayerTranscoder.source_layers`);
2. `residual_write`: their sum over l <= k < m, what layer m's encoder sees of them;
3. `feature_partners`: one feature's strongest upstream (targets it reads: sources at
   l < its layer) and downstream (targets at m > its layer) partners, by |V|;
4. `all_partners` / `write_partners`: the top-k of every feature in both directions, one
   (source layer, target layer, block of `block_size` sources) block of V at a time,
   merged into a running top-k per feature, so memory is O(n_features * k + block_size *
   d_transcoder) rather than O(n_features^2); written to Parquet (`PARTNERS_SCHEMA`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline.atomic import staged
from pipeline.clt import CrossLayerTranscoder

DIRECTIONS = ("upstream", "downstream")
"""`upstream`: the sources whose writes a feature's encoder reads; `downstream`: the targets
that read a feature's writes."""

PARTNERS_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("direction", pa.string(), nullable=False),  # upstream | downstream
        pa.field("rank", pa.int16(), nullable=False),  # 0 = largest |weight|
        pa.field("partner_layer", pa.int16(), nullable=False),
        pa.field("partner_feature", pa.int32(), nullable=False),
        pa.field("weight", pa.float32(), nullable=False),  # V[source, target], signed
    ]
)


@dataclass(frozen=True)
class Partners:
    """One feature's partners in one direction, strongest (largest |weight|) first."""

    layers: torch.Tensor  # (n,) int64
    features: torch.Tensor  # (n,) int64
    weights: torch.Tensor  # (n,) float32


def decoder_slice(transcoder: CrossLayerTranscoder, source: int, output: int) -> torch.Tensor | None:
    """What layer `source`'s features write to MLP output `output`: (d_transcoder, d_model),
    or None where its decoder does not reach that layer."""
    if source not in transcoder.source_layers(output):
        return None
    return transcoder.W_dec[source][:, output - source if transcoder.shape.kind == "clt" else 0]


def residual_write(
    transcoder: CrossLayerTranscoder, source: int, target: int, features: torch.Tensor | slice = slice(None)
) -> torch.Tensor:
    """What layer `target`'s encoder reads of layer `source`'s `features`: the sum of their
    decoder vectors to MLP outputs source..target-1, (n_features, d_model)."""
    W = transcoder.W_dec[source][features, 0]
    out = torch.zeros_like(W)
    for output in range(source, target):
        dec = decoder_slice(transcoder, source, output)
        if dec is not None:
            out += dec[features]
    return out


def _check_feature(transcoder: CrossLayerTranscoder, layer: int, feature: int) -> None:
    L, F = transcoder.shape.n_layers, transcoder.shape.d_transcoder
    if not (0 <= layer < L and 0 <= feature < F):
        raise ValueError(
            f"no layer {layer} feature {feature}: the transcoder has layers 0..{L - 1} and "
            f"features 0..{F - 1}"
        )


def _top(weights: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` entries of largest |weight| along the last dim, strongest first."""
    top = weights.abs().topk(min(k, weights.shape[-1]), dim=-1).indices
    return weights.gather(-1, top), ids.gather(-1, top)


@torch.no_grad()
def feature_partners(
    transcoder: CrossLayerTranscoder, layer: int, feature: int, *, top: int = 10
) -> dict[str, Partners]:
    """Feature `feature` of `layer`'s `top` strongest partners in each of `DIRECTIONS`."""
    _check_feature(transcoder, layer, feature)
    L, F = transcoder.shape.n_layers, transcoder.shape.d_transcoder
    W_enc = transcoder.W_enc.float()  # (n_layers, d_model, d_tc)
    upstream = [residual_write(transcoder, l, layer).float() @ W_enc[layer, :, feature] for l in range(layer)]
    downstream = [
        residual_write(transcoder, layer, m, slice(feature, feature + 1)).float()[0] @ W_enc[m]
        for m in range(layer + 1, L)
    ]
    out = {}
    for direction, weights, first in (("upstream", upstream, 0), ("downstream", downstream, layer + 1)):
        w = torch.cat(weights) if weights else torch.zeros(0)
        ids = torch.arange(first * F, first * F + len(w))
        w, ids = _top(w, ids, top)
        out[direction] = Partners(ids // F, ids % F, w)
    return out


def _blocks(transcoder: CrossLayerTranscoder, block_size: int):
    """The (source layer, target layer, first source, V block (n_sources, d_tc)) blocks of the
    virtual weights, every source layer's writes accumulated along the targets."""
    L = transcoder.shape.n_layers
    W_enc = transcoder.W_enc.float()
    for l in range(L - 1):
        for s0 in range(0, transcoder.shape.d_transcoder, block_size):
            rows = slice(s0, s0 + block_size)
            write = torch.zeros_like(transcoder.W_dec[l][rows, 0], dtype=torch.float32)
            for m in range(l + 1, L):
                dec = decoder_slice(transcoder, l, m - 1)
                if dec is not None:
                    write += dec[rows].float()
                yield l, m, s0, write @ W_enc[m]


def _n_blocks(transcoder: CrossLayerTranscoder, block_size: int) -> int:
    L, F = transcoder.shape.n_layers, transcoder.shape.d_transcoder
    return L * (L - 1) // 2 * -(-F // block_size)


@torch.no_grad()
def all_partners(
    transcoder: CrossLayerTranscoder, *, top: int = 10, block_size: int = 1024, progress: bool = True
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every feature's `top` strongest partners in each of `DIRECTIONS`: per direction and
    layer, (weights, partner ids) of shape (d_transcoder, <= top), strongest first; a
    partner id is partner_layer * d_transcoder + partner_feature."""
    L, F = transcoder.shape.n_layers, transcoder.shape.d_transcoder
    empty = (torch.zeros(F, 0), torch.zeros(F, 0, dtype=torch.long))
    upstream = [empty] * L
    downstream: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (layer, s0): rows s0..
    bar = tqdm(
        total=_n_blocks(transcoder, block_size), desc="virtual weights", unit="block", disable=not progress
    )
    for l, m, s0, V in _blocks(transcoder, block_size):  # V: (n_sources, d_tc of layer m)
        n = V.shape[0]
        w, ids = downstream.get((l, s0), (empty[0][:n], empty[1][:n]))
        targets = torch.arange(m * F, (m + 1) * F).expand(n, F)
        downstream[l, s0] = _top(torch.cat([w, V], 1), torch.cat([ids, targets], 1), top)
        w, ids = upstream[m]
        sources = torch.arange(l * F + s0, l * F + s0 + n).expand(F, n)
        upstream[m] = _top(torch.cat([w, V.t()], 1), torch.cat([ids, sources], 1), top)
        bar.update()
    bar.close()
    down = [empty] * L
    for l in range(L - 1):
        chunks = [downstream[l, s0] for s0 in range(0, F, block_size)]
        down[l] = (torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]))
    return {"upstream": upstream, "downstream": down}


def partners_table(state: dict, layer: int, d_transcoder: int) -> pa.Table:
    """One layer's rows of the partners table (`PARTNERS_SCHEMA`) from `all_partners`, by
    feature, direction (`DIRECTIONS` order) and rank."""
    parts = [state[direction][layer] for direction in DIRECTIONS]
    w = torch.cat([p[0] for p in parts], 1)  # (d_tc, k_up + k_down): feature-major rows
    ids = torch.cat([p[1] for p in parts], 1)
    n = w.shape[0]
    widths = [p[0].shape[1] for p in parts]
    direction = [d for d, k in zip(DIRECTIONS, widths) for _ in range(k)] * n
    rank = torch.cat([torch.arange(k) for k in widths]).repeat(n)
    columns = {
        "layer": torch.full((w.numel(),), layer),
        "feature": torch.arange(n).repeat_interleave(w.shape[1]),
        "direction": direction,
        "rank": rank,
        "partner_layer": ids.flatten() // d_transcoder,
        "partner_feature": ids.flatten() % d_transcoder,
        "weight": w.flatten(),
    }
    return pa.table(
        {
            name: pa.array(v if isinstance(v, list) else v.numpy(), type=PARTNERS_SCHEMA.field(name).type)
            for name, v in columns.items()
        },
        schema=PARTNERS_SCHEMA,
    )


def write_partners(
    transcoder: CrossLayerTranscoder,
    out: str | Path,
    *,
    top: int = 10,
    block_size: int = 1024,
    progress: bool = True,
) -> Path:
    """Every feature's `top` partners in both directions as Parquet at `out` (atomically),
    sorted by (layer, feature, direction, rank), one row group per layer."""
    state = all_partners(transcoder, top=top, block_size=block_size, progress=progress)
    out = Path(out)
    with staged(out, suffix=".tmp") as tmp:
        with pq.ParquetWriter(tmp, PARTNERS_SCHEMA) as writer:
            for layer in range(transcoder.shape.n_layers):
                writer.write_table(partners_table(state, layer, transcoder.shape.d_transcoder))
    return out
