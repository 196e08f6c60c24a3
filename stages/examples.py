"""`examples` stage: every feature's top-activating contexts, interval and random samples,
activation histogram, quantiles, frequency and logit lens, from the stored MLP inputs and
the exported transcoder, to Parquet (`paths.examples`).

`torchrun --standalone --nproc_per_node=N -m stages.examples` (or `CLT_NPROC=N`) splits the
tokens over N processes; the tables' bytes are the same.
"""

from pipeline.examples import run
from pipeline.runtime import run_stage


def main() -> None:
    run_stage(run, distributed=True)


if __name__ == "__main__":
    main()
