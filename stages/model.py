"""`model` stage: resolve `model.name` and save it as a plain Hugging Face folder.

Every later stage, and circuit-tracer, load this folder, so they all see the same bytes.
"""

from pipeline.config import Params
from pipeline.model import materialize
from pipeline.stage import run_stage


def run(params: Params) -> None:
    materialize(params.model.name, params.paths.model_dir)


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()
