"""Circuit tracing with cross-layer transcoders: the library behind the DVC stages."""
