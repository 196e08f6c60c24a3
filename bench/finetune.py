"""A trained transcoder fine-tuned on KL to the original model (`pipeline.finetune`).

    python -m bench.finetune --source data/transcoder [--params params.yaml] [--steps 100]
        [--batch-size 8] [--lr 1e-4] [--mse-coef 1.0]

Reads the transcoder exported at `--source`, fine-tunes it through the spliced model on
sequences of training documents from `paths.activations`, and writes it to
`paths.transcoder` with `metrics/train.json` (validation NMSE, L0 and dead fraction, as
the `train` stage measures them) and `train_curve.csv` (each step's KL, FVU and L0).
`python -m bench.recipe` runs it for the `FINETUNES` runs, then evaluates and scores them.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from pipeline.clt import export_transcoder, load_transcoder
from pipeline.config import load_params
from pipeline.evaluate import split_sequences
from pipeline.finetune import kl_finetune
from pipeline.model import load_model
from pipeline.runtime import configure_torch, resolve_device, setup_logging, torch_dtype
from pipeline.splice import check_fits
from pipeline.store import ActivationStore
from pipeline.train import sample_rows, validate, write_metrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, required=True, help="exported transcoder folder to start from")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--steps", type=int, default=100, help="Adam steps")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (linear decay to 0)")
    parser.add_argument("--mse-coef", type=float, default=1.0, help="weight of the mean per-layer FVU")
    parser.add_argument("--n-sequences", type=int, default=100_000, help="training sequences to draw from")
    args = parser.parse_args()
    setup_logging()
    params = load_params(args.params)
    configure_torch(params.runtime.num_threads)
    torch.manual_seed(params.train.seed)
    device = resolve_device(params.runtime.device)
    transcoder = load_transcoder(args.source).to(device)
    model, _ = load_model(params.paths.model_dir, dtype=torch_dtype(params.model.dtype), device=device)
    check_fits(transcoder, model, str(args.source))
    store = ActivationStore(params.paths.activations)
    val_fraction = params.train.val_fraction
    sequences = torch.from_numpy(split_sequences(store, "train", val_fraction, args.n_sequences))
    logging.info("fine-tuning on %d training sequences of %d tokens", *sequences.shape)
    history = kl_finetune(
        model,
        transcoder,
        sequences,
        n_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        mse_coef=args.mse_coef,
        compute_dtype=torch_dtype(params.train.compute_dtype, device),
        seed=params.train.seed,
    )
    transcoder = transcoder.cpu()
    with torch.no_grad():
        metrics = validate(transcoder, sample_rows(store, "val", val_fraction, 8192))
    logging.info("validation: %s", metrics["mean"])
    export_transcoder(transcoder, params.paths.transcoder, model_name=params.model.name)
    write_metrics(Path(params.paths.metrics), metrics, history)


if __name__ == "__main__":
    main()
