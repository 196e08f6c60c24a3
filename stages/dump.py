"""`dump` stage: store every layer's MLP input and output on the corpus in a Zarr store.

Resumable: killed mid-way, the next run continues after the last complete shard.
"""

from pipeline.dump import run
from pipeline.runtime import run_stage


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()
