"""The circuit-tracer comparison harness: runs the reference implementation beside ours.

`bash ct/venv.sh` builds circuit-tracer's separate venv (`.ct-venv`); the scripts `attribute.py`,
`encode.py`, `check_features.py` and `check_model.py` run under its python, and
`python -m ct.compare_graphs` (under ours) drives both sides on one prompt.
"""
