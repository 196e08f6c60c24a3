"""How much an 8-bit activation store would cost: bf16 and two float8 e4m3 schemes against
the model's float32 activations, on the default model and corpus.

For each scheme and each stored activation (MLP input `resid_mid`, MLP output `mlp_out`):
the relative Frobenius error over all (token, layer) rows, the worst element error
relative to its row's max |value|, and the NMSE floor, the per-layer NMSE of the
quantised `mlp_out` against the float32 one (what a perfect transcoder trained on the
quantised targets would still miss, in the units of `metrics/train.json`).

Schemes: `bfloat16` (today's store); `float8_e4m3` (a plain cast, clamped to +-448);
`float8_e4m3+scale` (the store's `dump.dtype: float8_e4m3`: each (token, layer) row divided
by max|row| / 448 before the cast, the scale kept in float32 beside it: 4 bytes per 576
values; read back as bfloat16).

    python -m bench.fp8 --n-tokens 2048
"""

from __future__ import annotations

import argparse

import torch

from pipeline.codec import E4M3_MAX, FP8, decode, encode
from pipeline.config import load_params
from pipeline.corpus import iter_documents, pack_documents
from pipeline.dump import _Target, capture_activations
from pipeline.model import bos_token_id, get_trunk, load_model


def quantise(x: torch.Tensor, scheme: str) -> torch.Tensor:
    """`x` (rows, d) stored in `scheme` and read back as float32."""
    if scheme == "bfloat16":
        return x.bfloat16().float()
    if scheme == "float8_e4m3":
        return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return decode(encode(x, FP8), FP8).float()  # the store's own codec


def activations(params, n_tokens: int) -> dict[str, torch.Tensor]:
    """float32 `resid_mid` and `mlp_out` of the first `n_tokens` corpus tokens: (rows, n_layers, d_model)."""
    model, tokenizer = load_model(params.paths.model_dir, dtype=torch.float32, device=torch.device("cpu"))
    corpus = pack_documents(
        iter_documents(params.corpus.path, params.corpus.text_field),
        tokenizer,
        context_len=params.corpus.context_len,
        n_tokens=n_tokens,
        bos_token_id=bos_token_id(tokenizer),
    )
    ids = torch.from_numpy(corpus.token_ids).long()
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    target = _Target()
    out = {n: torch.empty(ids.numel(), n_layers, d_model) for n in ("resid_mid", "mlp_out")}
    with torch.no_grad(), capture_activations(model, target):
        for i in range(0, len(ids), 8):
            batch = ids[i : i + 8]
            rows = slice(i * ids.shape[1], (i + len(batch)) * ids.shape[1])
            target.buffers = {n: out[n][rows] for n in out}
            get_trunk(model)(input_ids=batch)
    keep = (torch.arange(ids.numel()) % ids.shape[1]) != 0  # BOS rows are not trained on
    return {n: v[keep] for n, v in out.items()}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--n-tokens", type=int, default=2048)
    args = parser.parse_args()
    acts = activations(load_params(args.params), args.n_tokens)
    n, n_layers, d_model = acts["mlp_out"].shape
    print(f"{n} tokens x {n_layers} layers x {d_model}, float32 reference")
    print(
        "scheme             | bytes/value | act       | rel. Frobenius | worst/row max "
        "| NMSE floor (mean, max layer)"
    )
    for scheme, nbytes in (("bfloat16", 2), ("float8_e4m3", 1), ("float8_e4m3+scale", 1 + 4 / d_model)):
        for name, x in acts.items():
            q = quantise(x.reshape(-1, d_model), scheme).reshape(x.shape)
            err = q - x
            frob = float(err.norm() / x.norm())
            worst = float((err.abs().amax(-1) / x.abs().amax(-1).clamp_min(1e-12)).max())
            centred = x - x.mean(0, keepdim=True)
            nmse = err.pow(2).sum((0, 2)) / centred.pow(2).sum((0, 2))  # (n_layers,)
            floor = f"{float(nmse.mean()):.2e}, {float(nmse.max()):.2e}" if name == "mlp_out" else ""
            print(f"{scheme:18} | {nbytes:11.3f} | {name:9} | {frob:14.2e} | {worst:13.2e} | {floor}")


if __name__ == "__main__":
    main()
