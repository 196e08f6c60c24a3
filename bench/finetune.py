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
import dataclasses
from pathlib import Path

import torch

from pipeline.clt import load_transcoder
from pipeline.config import load_params
from pipeline.finetune import kl_phase, phase_summary
from pipeline.runtime import configure_torch, keep_freed_memory, setup_logging
from pipeline.store import ActivationStore
from pipeline.train import validate_and_export


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, required=True, help="exported transcoder folder to start from")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--steps", type=int, default=100, help="Adam steps (train.kl_steps)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (train.kl_batch_size)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, decays linearly to 0")
    parser.add_argument("--mse-coef", type=float, default=1.0, help="weight of the mean per-layer FVU")
    parser.add_argument("--n-sequences", type=int, default=100_000, help="training sequences to draw from")
    args = parser.parse_args()
    setup_logging()
    keep_freed_memory()  # as the train stage, whose KL phase this is
    params = load_params(args.params)
    params = dataclasses.replace(
        params,
        train=dataclasses.replace(
            params.train,
            kl_steps=args.steps,
            kl_batch_size=args.batch_size,
            kl_lr=args.lr,
            kl_mse_coef=args.mse_coef,
        ),
    )
    configure_torch(params.runtime.num_threads)
    torch.manual_seed(params.train.seed)
    transcoder = load_transcoder(args.source)
    history = kl_phase(params, transcoder, str(args.source), n_sequences=args.n_sequences)
    store = ActivationStore(params.paths.activations)
    validate_and_export(params, store, transcoder.cpu(), history, {"kl_phase": phase_summary(history)})


if __name__ == "__main__":
    main()
