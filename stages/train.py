"""`train` stage: fit the cross-layer transcoder on the stored activations and export it
in circuit-tracer's format, with validation metrics and loss curves for DVC.

Resumable: killed mid-way, the next run continues from the last checkpoint.
"""

from pipeline import setup_logging
from pipeline.config import load_params
from pipeline.model import configure_torch
from pipeline.train import run


def main() -> None:
    setup_logging()
    params = load_params()
    configure_torch(params.runtime.num_threads)
    run(params)


if __name__ == "__main__":
    main()
