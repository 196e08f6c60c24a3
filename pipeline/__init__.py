"""Circuit tracing with cross-layer transcoders: the library behind the DVC stages."""

import logging


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr with timestamps; used by the stage entry points and the CLI."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
