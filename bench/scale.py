"""A paper model of feature-parallel CLT training at scale, and its all-reduce measured here.

    python -m bench.scale [--batch-size 4096] [--mfu 0.4] [--measure-batch 256] [--no-measure]

1. The model (`scale_row`): for SmolLM2-135M (30 layers, d_model 576) at 4k features per
   layer, Llama-3.2-1B (16 x 2048) at 32k and Gemma-2-2B (26 x 2304) at 16k, on 1, 8 and 64
   GPUs (feature parallel over all of them, `pipeline.train`): training FLOPs per token
   (encoder 2 L d F, decoder 2 F d L(L+1)/2, backward twice the forward), bytes all-reduced
   per step and rank (the bf16 partial reconstruction, (batch, L, d_model), by a ring:
   2 (N-1)/N of it), memory per rank (float32 weights, gradients and two Adam moments,
   a bf16 copy of the weights, and the step's activations), the step time predicted from a
   peak FLOP/s at an MFU plus the all-reduce at the link bandwidth (NVLink within a node
   of 8, InfiniBand across nodes; the all-reduce sits between the decoder and the loss, so
   it does not overlap compute), the scaling efficiency T_1 / (N T_N), and what the
   activation store must deliver: its size per token and the read bandwidth at the
   predicted tokens/s, where every rank reads the whole batch.
2. Measured on this machine (`--measure`, 2 CPU processes under torchrun, gloo): the
   all-reduce of a step's partial reconstruction at several sizes, fitted by a latency +
   bandwidth model that predicts the real one's time (printed as measured / predicted), and
   `Trainer.train_step` of a transcoder of the default model's shape on the same batches on
   2 feature-parallel processes vs 1 process, with the all-reduce's share of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

GPU_MEMORY = 80e9
"""Bytes of an H100's memory."""


@dataclass(frozen=True)
class Hardware:
    peak_flops: float = 990e12
    """Dense bf16 FLOP/s of an H100 SXM."""
    mfu: float = 0.4
    nvlink: float = 450e9
    """Bytes/s per GPU within a node (NVLink 4, one direction)."""
    infiniband: float = 50e9
    """Bytes/s per GPU across nodes (400 Gb/s NDR per GPU)."""
    gpus_per_node: int = 8
    latency: float = 10e-6
    """Seconds per ring hop of an all-reduce."""


@dataclass(frozen=True)
class Model:
    name: str
    n_layers: int
    d_model: int
    d_transcoder: int

    @property
    def n_params(self) -> int:
        L, d, F = self.n_layers, self.d_model, self.d_transcoder
        return L * d * F + F * d * L * (L + 1) // 2 + 2 * L * F + L * d

    @property
    def flops_per_token(self) -> float:
        L, d, F = self.n_layers, self.d_model, self.d_transcoder
        forward = 2 * L * d * F + F * d * L * (L + 1)  # encoder + every decoder to later layers
        return 3 * forward  # backward: twice the forward


MODELS = (
    Model("SmolLM2-135M", 30, 576, 4096),
    Model("Llama-3.2-1B", 16, 2048, 32768),
    Model("Gemma-2-2B", 26, 2304, 16384),
)


def ring_seconds(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """A ring all-reduce of `nbytes` over `n` ranks: 2 (n-1) hops, each moving nbytes / n."""
    if n == 1:
        return 0.0
    return 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / bandwidth


def scale_row(m: Model, n: int, batch: int, hw: Hardware) -> dict:
    L, d, F = m.n_layers, m.d_model, m.d_transcoder
    recon_bytes = batch * L * d * 2  # bf16 partial reconstruction
    allreduce_bytes = 2 * (n - 1) / n * recon_bytes if n > 1 else 0.0
    link = hw.nvlink if n <= hw.gpus_per_node else hw.infiniband
    weights = m.n_params / n * 4
    adam = m.n_params / n * 4 * 3 + m.n_params / n * 2  # grad + 2 moments (fp32), bf16 copy
    # per token: x, y (bf16 batch + fp32 normalised) on every rank, the full reconstruction
    # (bf16 partial, summed, fp32), and the rank's features: h, acts (bf16), 2 masks, and the
    # fp32 copies the sparsity and pre-activation terms make
    activations = batch * (L * d * (4 + 8 + 2 + 2 + 4) + L * F / n * (2 + 2 + 1 + 1 + 4 + 4))
    compute_s = m.flops_per_token * batch / n / (hw.peak_flops * hw.mfu)
    comm_s = ring_seconds(recon_bytes, n, link, hw.latency)
    step_s = compute_s + comm_s
    tokens_s = batch / step_s
    store_bytes_token = 2 * L * d * 2  # bf16 resid_mid and mlp_out of every layer
    return {
        "model": m.name,
        "F/layer": F,
        "gpus": n,
        "params": m.n_params,
        "GFLOP/token": m.flops_per_token / 1e9,
        "allreduce MB/step/rank": allreduce_bytes / 1e6,
        "weights GB": weights / 1e9,
        "adam+grad GB": adam / 1e9,
        "acts GB": activations / 1e9,
        "total GB": (weights + adam + activations) / 1e9,
        "compute ms": compute_s * 1e3,
        "comm ms": comm_s * 1e3,
        "step ms": step_s * 1e3,
        "tokens/s": tokens_s,
        "store KB/token": store_bytes_token / 1e3,
        "store read GB/s (all ranks)": tokens_s * store_bytes_token * n / 1e9,
        "store read GB/s (once)": tokens_s * store_bytes_token / 1e9,
    }


def print_table(rows: list[dict], keys: list[str]) -> None:
    def fmt(v):
        if isinstance(v, str):
            return v
        if isinstance(v, int) and v < 1e6:
            return str(v)
        return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.3e}"

    cells = [[fmt(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(" | ".join(k.rjust(w) for k, w in zip(keys, widths)))
    print("-|-".join("-" * w for w in widths))
    for c in cells:
        print(" | ".join(v.rjust(w) for v, w in zip(c, widths)))


def paper_model(batch: int, hw: Hardware) -> None:
    rows = [scale_row(m, n, batch, hw) for m in MODELS for n in (1, 8, 64)]
    for r in rows:
        one = next(o for o in rows if o["model"] == r["model"] and o["gpus"] == 1)
        r["efficiency"] = one["step ms"] / (r["gpus"] * r["step ms"])
        r["fits 80GB"] = "yes" if r["total GB"] * 1e9 <= GPU_MEMORY else "NO"
    print(
        f"Paper model: batch {batch} tokens/step, H100 bf16 {hw.peak_flops / 1e12:.0f} TFLOP/s at "
        f"{hw.mfu:.0%} MFU, all-reduce ring at {hw.nvlink / 1e9:.0f} GB/s (NVLink, <= 8 GPUs) or "
        f"{hw.infiniband / 1e9:.0f} GB/s (IB, 64 GPUs), {hw.latency * 1e6:.0f} us per hop\n"
    )
    print_table(rows, ["model", "F/layer", "gpus", "params", "GFLOP/token", "allreduce MB/step/rank"])
    print()
    print_table(rows, ["model", "gpus", "weights GB", "adam+grad GB", "acts GB", "total GB", "fits 80GB"])
    print()
    print_table(
        rows,
        ["model", "gpus", "compute ms", "comm ms", "step ms", "efficiency", "tokens/s"],
    )
    print()
    print_table(
        rows, ["model", "gpus", "store KB/token", "store read GB/s (all ranks)", "store read GB/s (once)"]
    )


# --- measured with gloo on this machine ----------------------------------------------------


def _time(fn, reps: int) -> float:
    """Median seconds of `fn()` over `reps` calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _synthetic_trainer(args, here):
    """A trainer of the default model's shape on random inputs (`Trainer.from_inputs`)."""
    from pipeline.clt import CLTShape, CrossLayerTranscoder
    from pipeline.config import TrainConfig
    from pipeline.loader import Batch
    from pipeline.train import Trainer

    torch.manual_seed(0)
    L, d = args.measure_layers, args.measure_d_model
    cfg = TrainConfig(
        d_transcoder=args.measure_d_transcoder, batch_size=args.measure_batch, compute_dtype="float32"
    )
    model = CrossLayerTranscoder(CLTShape(L, d, cfg.d_transcoder))
    x = torch.randn(1024, L, d)
    x = x / x.norm(dim=-1, keepdim=True) * d**0.5
    trainer = Trainer.from_inputs(model, cfg, x, device=torch.device("cpu"), here=here)
    batches = [
        Batch(torch.randn(args.measure_batch, L, d), torch.randn(args.measure_batch, L, d)) for _ in range(2)
    ]
    return trainer, batches


def measure_worker(args) -> None:
    """Under torchrun: the all-reduce at several sizes and the feature-parallel step."""
    import torch.distributed as dist

    from pipeline.distributed import barrier, world

    here = world(torch.device("cpu"))
    L, d, B = args.measure_layers, args.measure_d_model, args.measure_batch
    target = B * L * d  # float32 elements of the step's partial reconstruction
    sizes = [2**k for k in range(8, 23, 2) if 2**k != target]
    results = {}
    for n in [*sizes, target]:
        t = torch.ones(n)
        barrier("bench: all-reduce")
        results[n] = _time(lambda t=t: dist.all_reduce(t), args.reps)
    trainer, batches = _synthetic_trainer(args, here)
    step = _time(lambda: [trainer.train_step(b) for b in batches], args.reps) / len(batches)
    if here.main:
        print(json.dumps({"allreduce": results, "target": target, "step": step}))


def fit_latency_bandwidth(times: dict[int, float]) -> tuple[float, float]:
    """Least squares t = a + b * bytes over the measured sizes: (latency s, bandwidth B/s)."""
    x = torch.tensor([4.0 * n for n in times], dtype=torch.float64)
    y = torch.tensor(list(times.values()), dtype=torch.float64)
    A = torch.stack([torch.ones_like(x), x], 1)
    a, b = torch.linalg.lstsq(A, y[:, None]).solution.flatten().tolist()
    return a, 1 / b


def measure(args) -> None:
    from pipeline.distributed import World

    torch.set_num_threads(2)
    trainer, batches = _synthetic_trainer(args, World())
    one_2t = _time(lambda: [trainer.train_step(b) for b in batches], args.reps) / len(batches)
    torch.set_num_threads(1)
    one_1t = _time(lambda: [trainer.train_step(b) for b in batches], args.reps) / len(batches)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "bench.scale", "--worker", *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if out.returncode:
        raise SystemExit(f"the torchrun measurement failed:\n{out.stderr[-3000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    times = {int(n): t for n, t in got["allreduce"].items()}
    target = got["target"]
    measured = times.pop(target)
    latency, bandwidth = fit_latency_bandwidth(times)
    predicted = latency + 4 * target / bandwidth
    L, d, B, F = args.measure_layers, args.measure_d_model, args.measure_batch, args.measure_d_transcoder
    print(
        f"\nMeasured here: gloo, 2 CPU processes x 1 thread; transcoder {L} x {d}, "
        f"{F} features/layer, batch {B}"
    )
    print(f"all-reduce sizes fitted: {min(times) * 4} B .. {max(times) * 4 / 1e6:.1f} MB")
    print(f"fit: latency {latency * 1e6:.0f} us, bandwidth {bandwidth / 1e9:.2f} GB/s")
    print(
        f"step's partial reconstruction, {4 * target / 1e6:.1f} MB float32: "
        f"measured {measured * 1e3:.2f} ms, "
        f"predicted {predicted * 1e3:.2f} ms, measured / predicted {measured / predicted:.2f}"
    )
    two = got["step"]
    print(
        f"train_step, 1 process x 2 threads: {one_2t * 1e3:.1f} ms; "
        f"1 process x 1 thread: {one_1t * 1e3:.1f} ms"
    )
    print(
        f"train_step, 2 feature-parallel processes x 1 thread: {two * 1e3:.1f} ms "
        f"({one_2t / two:.2f}x the 2-thread process, {one_1t / two:.2f}x the 1-thread one); "
        f"the all-reduce is {measured / two:.0%} of it"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=4096, help="tokens per step of the paper model")
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--no-measure", action="store_true", help="only the paper model")
    ap.add_argument("--measure-batch", type=int, default=256)
    ap.add_argument("--measure-layers", type=int, default=30, help="default: SmolLM2-135M's")
    ap.add_argument("--measure-d-model", type=int, default=576)
    ap.add_argument("--measure-d-transcoder", type=int, default=256, help="default: params.yaml's")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        measure_worker(args)
        return
    paper_model(args.batch_size, Hardware(mfu=args.mfu))
    if not args.no_measure:
        measure(args)


if __name__ == "__main__":
    main()
