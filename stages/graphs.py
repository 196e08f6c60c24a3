"""`graphs` stage: an attribution graph (circuit-tracer JSON + PNG) for every prompt file in
`paths.prompts`, computing only the graphs whose prompt, transcoder, model or parameters
changed, and removing the graphs of deleted prompts.
"""

from pipeline.graphs import run
from pipeline.runtime import run_stage


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()
