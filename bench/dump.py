"""Dump throughput vs. a bare forward pass of the same model, measured side by side.

    python -m bench.dump [--n-tokens 16384] [--rounds 2] [--compare-dtypes]

Both runs use the materialised model (`paths.model_dir`), `model.dtype`, `dump.batch_size`
and the same packed sequences. "Bare forward" is the trunk forward (no LM head, no hooks,
no copies, no writes); "dump" is `dump_activations` writing a complete store to a
temporary folder next to `paths.activations`. Rounds alternate the two so machine noise
hits both alike; the ratio of each round is printed, then the median.

`--compare-dtypes` also measures bfloat16 vs float32: bare-forward throughput and the
relative error of bf16 activations against fp32 ones (max |a16 - a32| / max |a32| per
hook, and the relative Frobenius error), to justify the default `model.dtype`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import load_params
from pipeline.corpus import iter_documents, pack_documents
from pipeline.dump import _Target, capture_activations, dump_activations, make_schema
from pipeline.model import bos_token_id, get_trunk, load_model
from pipeline.runtime import resolve_device, torch_dtype


def bare_forward(model, token_ids, batch_size: int) -> float:
    """Tokens per second of the trunk forward alone."""
    trunk = get_trunk(model)
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(token_ids), batch_size):
            trunk(input_ids=torch.from_numpy(token_ids[b : b + batch_size]).long(), use_cache=False)
    return token_ids.size / (time.perf_counter() - start)


def dump_throughput(model, corpus, schema, batch_size: int, where: Path) -> float:
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        start = time.perf_counter()
        dump_activations(
            model, corpus, Path(tmp) / "bench.zarr", schema=schema, batch_size=batch_size, progress=False
        )
        return schema.n_tokens / (time.perf_counter() - start)


def activations(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    cfg = model.config
    target = _Target()
    target.buffers = {
        n: torch.empty(ids.numel(), cfg.num_hidden_layers, cfg.hidden_size) for n in ("resid_mid", "mlp_out")
    }
    with capture_activations(model, target), torch.inference_mode():
        get_trunk(model)(input_ids=ids, use_cache=False)
    return target.buffers


def compare_dtypes(params, corpus, batch_size: int, device) -> None:
    ids = torch.from_numpy(corpus.token_ids[:batch_size]).long()
    acts, speed = {}, {}
    for name in ("float32", "bfloat16"):
        model, _ = load_model(params.paths.model_dir, dtype=torch_dtype(name), device=device)
        bare_forward(model, corpus.token_ids[:batch_size], batch_size)  # warm-up
        speed[name] = bare_forward(model, corpus.token_ids[: 4 * batch_size], batch_size)
        acts[name] = activations(model, ids)
    print(
        f"bare forward float32: {speed['float32']:.0f} tok/s, bfloat16: {speed['bfloat16']:.0f} tok/s, "
        f"ratio bf16/fp32 = {speed['bfloat16'] / speed['float32']:.2f}"
    )
    cfg = model.config
    for hook in ("resid_mid", "mlp_out"):
        # (batch, pos, n_layers, d_model) without position 0: BOS's huge norm would dominate
        a32, a16 = (
            acts[name][hook].reshape(batch_size, -1, cfg.num_hidden_layers, cfg.hidden_size)[:, 1:]
            for name in ("float32", "bfloat16")
        )
        err = a16 - a32
        max_rel = (err.abs().amax(dim=(0, 1, 3)) / a32.abs().amax(dim=(0, 1, 3))).max().item()
        fro = (err.norm() / a32.norm()).item()
        print(
            f"{hook}: bf16 vs fp32, max|err|/max|a| (worst layer) = {max_rel:.4f}, "
            f"relative Frobenius error = {fro:.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--n-tokens", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compare-dtypes", action="store_true")
    args = parser.parse_args()

    params = load_params(args.params)
    device = resolve_device(params.runtime.device)
    model, tokenizer = load_model(
        params.paths.model_dir, dtype=torch_dtype(params.model.dtype), device=device
    )
    corpus = pack_documents(
        iter_documents(params.corpus.path, params.corpus.text_field),
        tokenizer,
        context_len=params.corpus.context_len,
        n_tokens=args.n_tokens,
        bos_token_id=bos_token_id(tokenizer),
    )
    schema = make_schema(model, params.model.name, corpus, params.dump)
    batch_size = params.dump.batch_size
    where = Path(params.paths.activations).parent
    where.mkdir(parents=True, exist_ok=True)
    print(
        f"model {params.model.name} ({params.model.dtype}, {device}), {schema.n_tokens} tokens, "
        f"batch {batch_size}x{params.corpus.context_len}, shard {schema.shard_tokens} tokens"
    )
    bare_forward(model, corpus.token_ids[:batch_size], batch_size)  # warm-up
    ratios = []
    for r in range(args.rounds):
        bare = bare_forward(model, corpus.token_ids, batch_size)
        dumped = dump_throughput(model, corpus, schema, batch_size, where)
        ratios.append(dumped / bare)
        print(f"round {r}: bare forward {bare:.0f} tok/s, dump {dumped:.0f} tok/s, ratio {dumped / bare:.3f}")
    print(f"dump / bare forward throughput (median of {args.rounds}): {statistics.median(ratios):.3f}")
    if args.compare_dtypes:
        compare_dtypes(params, corpus, batch_size, device)


if __name__ == "__main__":
    main()
