"""`model` stage: resolve `model.name` and save it as a plain Hugging Face folder.

Every later stage, and circuit-tracer, load this folder, so they all see the same bytes.
"""

from pipeline import setup_logging
from pipeline.config import load_params
from pipeline.model import materialize


def main() -> None:
    setup_logging()
    params = load_params()
    materialize(params.model.name, params.paths.model_dir)


if __name__ == "__main__":
    main()
