"""Training throughput from the Zarr store vs. from memory, and sparse vs. dense decoding.

    python -m bench.train [--steps 40] [--rounds 2] [--d-transcoder-big 4096] [--decoder-reps 3]

1. The same optimisation steps (config from params.yaml `train:`), once fed by the
   `ActivationLoader` stream (shards read, shuffled and gathered into batches in a
   background thread) and once from the same batches already in memory; rounds
   alternate which goes first. The first step of each is a warm-up, outside the timing;
   for the loader it includes reading the first group of shards, which a training run
   pays once (printed separately).
2. The decoder's forward + backward as in a training step (float32 parameters,
   gradients set to None in between, `train.compute_dtype`), dense vs. token-level sparse,
   at L0 = 16 and 64 per layer, at `train.d_transcoder` and at a larger dictionary. The
   sparse path's activation gradient also covers the STE window: inactive pairs at the
   rate measured on the default transcoder (2.9 per token of 256 features, 1.1%).
3. `--full-step`: whole training steps (`Trainer.train_step`: forward, loss, backward,
   Adam), dense vs. sparse decoder, each with the JumpReLU terms eager and compiled
   (`train.compile`), interleaved, on synthetic inputs of the default model's
   shapes (no activation store needed), at d_transcoder 256 and `--d-transcoder-big`, L0
   16 and 32. b_enc is set so each feature fires on L0 / d_transcoder of the tokens and the
   learning rate is tiny, so that L0 stays put while timing (Adam costs the same at any rate).
   `--n-layers` measures fewer layers of the same width where all of them do not fit memory.

    python -m bench.train --full-step [--n-layers 8] [--step-reps 3]

Memory is allocated as the train stage has it (`pipeline.runtime.keep_freed_memory`);
`--glibc-default` measures glibc's default instead (a setting of the whole process).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import statistics
import time

import torch

from pipeline.clt import CLTShape, CrossLayerTranscoder
from pipeline.config import load_params
from pipeline.loader import ActivationLoader, Batch
from pipeline.runtime import keep_freed_memory, torch_dtype
from pipeline.store import ActivationStore
from pipeline.train import Trainer

WINDOW_RATE = 2.9 / 256  # inactive pairs in the STE window, per feature (default transcoder)


def train_seconds(trainer: Trainer, batches) -> tuple[float, float]:
    """(seconds of the first step, seconds per step of the others)."""
    times = []
    start = time.perf_counter()
    for batch in batches:
        trainer.train_step(batch)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times[0], sum(times[1:]) / (len(times) - 1)


def compare_loader(params, steps: int, rounds: int) -> None:
    cfg = params.train
    store = ActivationStore(params.paths.activations)
    loader = ActivationLoader(
        store,
        batch_size=cfg.batch_size,
        val_fraction=cfg.val_fraction,
        buffer_shards=cfg.buffer_shards,
        seed=cfg.seed,
    )
    trainer = Trainer(store, cfg, device=torch.device("cpu"))
    print(
        f"store {store.n_tokens} tokens; {cfg.kind} d_transcoder={cfg.d_transcoder}, batch {cfg.batch_size}, "
        f"buffer_shards {cfg.buffer_shards}, {steps} timed steps per measurement, "
        f"{torch.get_num_threads()} threads"
    )
    ratios = []
    for r in range(rounds):
        start = (r + 1) * loader.batches_per_epoch  # a fresh epoch each round: real reads
        with contextlib.closing(loader.batches(start)) as it:
            in_memory = [b for b in itertools.islice(it, steps + 1)]
        timings = {}
        for mode in ("memory", "zarr") if r % 2 == 0 else ("zarr", "memory"):
            if mode == "memory":
                timings[mode] = train_seconds(trainer, in_memory)
            else:
                with contextlib.closing(loader.batches(start)) as it:
                    timings[mode] = train_seconds(trainer, itertools.islice(it, steps + 1))
        (first_mem, mem), (first, zarr_) = timings["memory"], timings["zarr"]
        ratios.append(mem / zarr_)
        with_start = (first_mem + steps * mem) / (first + steps * zarr_)
        print(
            f"round {r}: from memory {cfg.batch_size / mem:.0f} tok/s, "
            f"from Zarr {cfg.batch_size / zarr_:.0f} tok/s, ratio {mem / zarr_:.3f}; first step "
            f"(Zarr: with the first group read) {first_mem:.1f} s vs {first:.1f} s, "
            f"ratio over all {steps + 1} steps {with_start:.3f}"
        )
    print(f"training from Zarr / from memory (median of {rounds}): {statistics.median(ratios):.3f}")


def decode_seconds(
    d_transcoder: int, n_layers: int, d_model: int, n_tokens: int, l0: int, dtype: torch.dtype, reps: int
) -> dict[str, float]:
    """Median seconds of the decoder's forward + backward: {"dense": s, "sparse": s}."""
    model = CrossLayerTranscoder(CLTShape(n_layers, d_model, d_transcoder))
    rank = torch.rand(n_layers, n_tokens, d_transcoder).argsort(-1)
    active = rank < l0  # exactly l0 per layer and token
    window = (rank >= l0) & (rank < l0 + max(1, round(WINDOW_RATE * d_transcoder)))
    acts = torch.rand(n_layers, n_tokens, d_transcoder) * active
    out = {}
    for sparse in [False, True] * (reps + 1):  # interleaved; the first of each is a warm-up
        a = acts.to(dtype).requires_grad_()
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        recon = model.decode(a, sparse=sparse, grad_mask=active | window if sparse else None)
        recon.float().pow(2).sum().backward()
        out.setdefault("sparse" if sparse else "dense", []).append(time.perf_counter() - start)
    return {k: statistics.median(v[1:]) for k, v in out.items()}


def compare_decoders(params, d_transcoder_big: int, reps: int) -> None:
    cfg = params.train
    schema = ActivationStore(params.paths.activations).schema
    print(f"decoder: {reps} timed runs per setting, {torch.get_num_threads()} threads")
    for d_tc in (cfg.d_transcoder, d_transcoder_big):
        for l0 in (l0 for l0 in (16, 64) if l0 < d_tc):
            shape = (schema.n_layers, schema.d_model, cfg.batch_size)
            t = decode_seconds(d_tc, *shape, l0, torch_dtype(cfg.compute_dtype), reps)
            print(
                f"decoder fwd+bwd, d_transcoder={d_tc}, L0={l0}, {cfg.batch_size} tokens: "
                f"dense {t['dense']:.3f} s, sparse {t['sparse']:.3f} s, "
                f"dense/sparse {t['dense'] / t['sparse']:.2f}x",
                flush=True,
            )


STEP_VARIANTS = {  # name: (sparse decoder, compiled JumpReLU terms)
    "dense": (False, False),
    "sparse": (True, False),
    "dense+compile": (False, True),
    "sparse+compile": (True, True),
}


def full_step_seconds(cfg, n_layers: int, d_model: int, l0: int, reps: int) -> dict[str, float]:
    """Median seconds of a whole training step with each variant, and the L0 measured:
    {"dense": s, "sparse": s, ..., "l0": l0, "auto": whether `sparse_decoder: auto` picks
    sparse there (its own timing, on the first step of a fresh trainer)}."""
    torch.manual_seed(0)
    model = CrossLayerTranscoder(CLTShape(n_layers, d_model, cfg.d_transcoder))
    x = torch.randn(cfg.batch_size, n_layers, d_model)
    batch = Batch(x=x, y=torch.randn_like(x))
    cfg = dataclasses.replace(cfg, init_rate=l0 / cfg.d_transcoder, lr=1e-9, warmup_steps=0)
    cpu = torch.device("cpu")
    variants = STEP_VARIANTS
    trainers = {
        name: Trainer.from_inputs(
            copy.deepcopy(model),
            dataclasses.replace(cfg, sparse_decoder=sparse, compile=fused),
            x,
            device=cpu,
        )
        for name, (sparse, fused) in variants.items()
    }
    times, l0s = {}, []
    for name in list(variants) * (reps + 1):  # interleaved; the first of each is a warm-up (and compile)
        start = time.perf_counter()
        record = trainers[name].train_step(batch)
        times.setdefault(name, []).append(time.perf_counter() - start)
        l0s.append(record["l0"])
    out = {k: statistics.median(v[1:]) for k, v in times.items()}
    l0 = statistics.median(l0s)
    auto = Trainer.from_inputs(
        copy.deepcopy(model), dataclasses.replace(cfg, sparse_decoder="auto"), x, device=cpu
    )
    return {**out, "l0": l0, "auto": auto.train_step(batch)["sparse_decoder"]}


def compare_full_steps(params, d_transcoder_big: int, n_layers: int | None, reps: int) -> None:
    cfg = params.train
    n_layers, d_model = n_layers or 30, 576  # the default model (SmolLM2-135M)
    print(
        f"full training steps: {n_layers} layers of d_model {d_model}, batch {cfg.batch_size}, "
        f"{cfg.compute_dtype}, {reps} timed steps each, {torch.get_num_threads()} threads"
    )
    for d_tc in (256, d_transcoder_big):
        for l0 in (16, 32):
            c = dataclasses.replace(cfg, d_transcoder=d_tc)
            t = full_step_seconds(c, n_layers, d_model, l0, reps)
            print(
                f"step, d_transcoder={d_tc}, L0={t['l0']:.1f}: dense {t['dense']:.3f} s, "
                f"sparse {t['sparse']:.3f} s, dense/sparse {t['dense'] / t['sparse']:.2f}x, "
                f"auto picks {'sparse' if t['auto'] else 'dense'}; compiled terms: dense "
                f"{t['dense+compile']:.3f} s, sparse {t['sparse+compile']:.3f} s, dense/sparse "
                f"{t['dense+compile'] / t['sparse+compile']:.2f}x; dense / best "
                f"{t['dense'] / min(t[k] for k in STEP_VARIANTS):.2f}x",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--d-transcoder-big", type=int, default=4096)
    parser.add_argument("--decoder-reps", type=int, default=3, help="timed decoder runs per setting")
    parser.add_argument("--skip-loader", action="store_true", help="only the decoder comparison")
    parser.add_argument("--skip-decoder", action="store_true", help="only the loader comparison")
    parser.add_argument(
        "--full-step", action="store_true", help="only whole training steps, dense vs sparse (no store)"
    )
    parser.add_argument("--n-layers", type=int, help="layers for --full-step (default: 30, the model's)")
    parser.add_argument("--step-reps", type=int, default=3, help="timed steps per setting (--full-step)")
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave malloc as glibc has it (default: as the train stage sets it, `keep_freed_memory`)",
    )
    args = parser.parse_args()
    if not args.glibc_default:
        keep_freed_memory()
    params = load_params(args.params)
    if args.full_step:
        compare_full_steps(params, args.d_transcoder_big, args.n_layers, args.step_reps)
        return
    if not args.skip_loader:
        compare_loader(params, args.steps, args.rounds)
    if not args.skip_decoder:
        compare_decoders(params, args.d_transcoder_big, args.decoder_reps)


if __name__ == "__main__":
    main()
