"""Where the circuit-tracer comparison harness lives, for the tests that use it.

`CT_PYTHON` is the interpreter of circuit-tracer's separate venv: the `CT_PYTHON` environment
variable, or `.ct-venv/bin/python` as `bash ct/venv.sh` builds it. Tests that need it skip
with `CT_SKIP_REASON` when it is missing. `CT_DIR` is the harness folder (`ct/`), whose
scripts run under that interpreter.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CT_DIR = ROOT / "ct"
CT_PYTHON = Path(os.environ.get("CT_PYTHON", ROOT / ".ct-venv" / "bin" / "python"))
CT_SKIP_REASON = "circuit-tracer venv not built (bash ct/venv.sh, or set CT_PYTHON)"
