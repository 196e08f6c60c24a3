"""`model` stage: resolve `model.name` and save it as a plain Hugging Face folder.

Every later stage, and circuit-tracer, load this folder, so they all see the same bytes.
"""

from pipeline.model import run
from pipeline.runtime import run_stage


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()
