"""`plots` stage: pictures of the dictionary from the transcoder, the examples' feature
statistics and the training and evaluation metrics: where each layer's features write,
feature density, per-layer NMSE / L0 / KL and a PCA map of decoder directions, as PNGs
and CSVs (`paths.plots`, rendered by `dvc plots show`).
"""

from pipeline.plots import run
from pipeline.runtime import run_stage


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()
