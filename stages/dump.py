"""`dump` stage: store every layer's MLP input and output on the corpus in a Zarr store.

Resumable: killed mid-way, the next run continues after the last complete shard.
"""

from pipeline import setup_logging
from pipeline.config import load_params
from pipeline.dump import run
from pipeline.model import configure_torch


def main() -> None:
    setup_logging()
    params = load_params()
    configure_torch(params.runtime.num_threads)
    run(params)


if __name__ == "__main__":
    main()
