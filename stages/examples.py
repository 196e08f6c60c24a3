"""`examples` stage: every feature's top-activating contexts, interval and random samples,
activation histogram, quantiles, frequency and logit lens, from the stored MLP inputs and
the exported transcoder, to Parquet (`paths.examples`).
"""

from pipeline.examples import run
from pipeline.runtime import run_stage


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()
