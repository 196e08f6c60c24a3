"""`evaluate` stage: splice the trained transcoder into the model in place of its MLPs and
measure, on held-out sequences, how much of the model's next-token behaviour it keeps
(CE loss, CE-loss recovered, KL, top-1 agreement; all layers and one at a time).
"""

from pipeline import setup_logging
from pipeline.config import load_params
from pipeline.evaluate import run
from pipeline.model import configure_torch


def main() -> None:
    setup_logging()
    params = load_params()
    configure_torch(params.runtime.num_threads)
    run(params)


if __name__ == "__main__":
    main()
