"""`graphs` stage: an attribution graph (circuit-tracer JSON + PNG) for every prompt file in
`paths.prompts`, computing only the graphs whose prompt, transcoder, model or parameters
changed, and removing the graphs of deleted prompts.

`torchrun --standalone --nproc_per_node=N -m stages.graphs` (or `CLT_NPROC=N`) splits the
prompts over N processes; the files are the same.
"""

from pipeline.graphs import run
from pipeline.runtime import run_stage


def main() -> None:
    run_stage(run, distributed=True)


if __name__ == "__main__":
    main()
