"""What every stage entry point does: `stages/<name>.py` and `clt <name>` call `run_stage`."""

from __future__ import annotations

from collections.abc import Callable

from pipeline import setup_logging
from pipeline.config import Params, load_params
from pipeline.model import configure_torch


def run_stage(run: Callable[[Params], object], params_path: str = "params.yaml") -> None:
    """Set up logging, read and validate `params.yaml` (a bad value stops here, before any
    work), apply the `runtime` settings, then call `run(params)`."""
    setup_logging()
    params = load_params(params_path)
    configure_torch(params.runtime.num_threads)
    run(params)
