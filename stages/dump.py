"""`dump` stage: store every layer's MLP input and output on the corpus in a Zarr store.

Resumable: killed mid-way, the next run writes only the shards that are not done.
`torchrun --standalone --nproc_per_node=N -m stages.dump` (or `CLT_NPROC=N`) splits the
shards over N processes; the store's bytes are the same.
"""

from pipeline.dump import run
from pipeline.runtime import run_stage


def main() -> None:
    run_stage(run, distributed=True)


if __name__ == "__main__":
    main()
