#!/usr/bin/env bash
# Set up a SEPARATE venv with the reference implementation `circuit-tracer` (PyPI), used by
# tests and benchmarks to compare against our own code. Never touches ./.venv.
#   bash ct/venv.sh
#   CT_VENV   venv path (default: <repo>/.ct-venv)
#   PYTHON    interpreter used to create it (default: python3)
#   TORCH_SPEC torch requirement (default: torch==2.13.0; a local CPU wheel is served for it)
# Idempotent: re-running on a complete venv only re-checks the pins (fast, no downloads).
#   1. torch first, pinned; it stays pinned (constraints file) so pip can never pull another torch.
#   2. circuit-tracer 0.5.0 (newest on PyPI) with nnsight==0.7.0 (0.8 breaks its import) and
#      transformers<=4.57.3 (circuit-tracer's own cap).
#   3. print the final versions and import circuit_tracer offline as a smoke test.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CT_VENV="${CT_VENV:-$ROOT/.ct-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CT_SPEC="${CT_SPEC:-circuit-tracer==0.5.0}"

[ -x "$CT_VENV/bin/python" ] || "$PYTHON" -m venv "$CT_VENV"
PY="$CT_VENV/bin/python"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
cat >"$CONSTRAINTS" <<EOF
$TORCH_SPEC
nnsight==0.7.0
transformers<=4.57.3
EOF

# pip -q still warns once per package about this machine's missing file:// extra indexes; hide only that.
pipq() { "$PY" -m pip install -q "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
pipq --upgrade pip
pipq "$TORCH_SPEC"
pipq -c "$CONSTRAINTS" "$CT_SPEC" "nnsight==0.7.0" "transformers<=4.57.3"

# Offline import check (no hub access is needed to import).
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" - <<'EOF'
import importlib.metadata as md
import circuit_tracer  # noqa: F401
from circuit_tracer import ReplacementModel, attribute  # noqa: F401
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt  # noqa: F401
for name in ("circuit-tracer", "torch", "nnsight", "transformers", "transformer-lens",
             "huggingface-hub", "tokenizers", "safetensors", "numpy"):
    print(f"{name}=={md.version(name)}")
EOF
echo "ct venv ready: $CT_VENV/bin/python"
